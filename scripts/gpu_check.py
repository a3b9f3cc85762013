"""One prepared check of lmzoo's CUDA path that prints every GPU figure of issue 15 in one go (no network).

    python scripts/gpu_check.py [--steps 60] [--parts train,decode] [--json out.json]
    python scripts/gpu_check.py --dry-run       # on a CPU: every part at tiny sizes (the script runs)

Parts (--parts, comma-separated; all by default), each printed as one JSON line when done:
  peak     the card's bf16 and fp32 matmul peak (8192^3), measured here: MFU is counted against it
  train    configs/gpt_gpu.yaml as shipped (bf16): eager, compiled, compiled with CUDA graphs
           (reduce-overhead): ms/step, tokens/s, MFU, compile time, against nanoGPT's 1.59 M tokens/s
  modern   configs/modern_gpu.yaml the same way, next to gpt_gpu.yaml
  quality  `lmzoo train configs/gpt_gpu.yaml` as shipped (early stopping): wall time, time to the best
           validation loss, its step and value, against nanoGPT's 115.6 s (a reference, not re-run here)
  seq2seq  configs/transformer.yaml with token batches: tokens/s, then a run of --seq2seq-minutes and
           its test BLEU (greedy and beam 5)
  decode   GPT decoding at context 256 (gpt_gpu.yaml size): KV cache, static cache, static cache with a
           CUDA-graph step, and recomputing the window; tokens/s and whether they give the same tokens
  lora     LoRA on a cuDNN LSTM: gradients reach A and B and one step changes the output
  attention  eager steps of transformer.yaml (token batches) and gpt_gpu.yaml with torch's own choice of
           attention kernel (cuDNN's on recent cards) and with lmzoo's (cuDNN left out), interleaved

The CUDA-marked tests run separately (scripts/gpu_check.sh runs both).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

NANOGPT = {"tok_s": 1.59e6, "wall_s": 115.6, "best_val": 1.4667}  # issue 15, same H200, as shipped
TINY_GPT = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.context_length=32",
    "data.seq_len=32",
    "data.batch_size=4",
]
TINY = {
    "gpt_gpu": TINY_GPT + ["train.max_steps=30", "train.eval_every=10", "train.eval_batches=2"],
    "modern_gpu": TINY_GPT + ["model.n_kv_heads=1", "model.d_ff=64"],
    "transformer": [
        "model.d_model=32",
        "model.n_heads=2",
        "model.n_encoder_layers=1",
        "model.n_decoder_layers=1",
        "model.d_ff=64",
        "tokenizer={kind: char}",
        "data.train=lmzoo:tatoeba_deu_eng/test",
        "data.max_tokens=512",
        "train.eval_batches=2",
    ],
}


@dataclass
class Check:
    """Where and how big: the real sizes on CUDA, tiny ones on the CPU for --dry-run."""

    dry: bool
    steps: int
    workdir: Path
    seq2seq_minutes: float
    peaks: dict[str, float]

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def config(self, name: str, extra: list[str] = ()):
        from lmzoo.run import load_config

        tiny = TINY.get(name, []) if self.dry else []
        precision = "fp32" if self.dry else "auto"
        overrides = [*tiny, f"train.device={self.device}", f"train.precision={precision}", *extra]
        overrides += [f"out_dir={self.workdir / 'runs'}"]
        return load_config(ROOT / "configs" / f"{name}.yaml", overrides)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_tflops(dtype: torch.dtype, device: str, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def part_peak(check: Check) -> dict:
    n = 512 if check.dry else 8192
    check.peaks["bf16"] = matmul_tflops(torch.bfloat16, check.device, n)
    torch.backends.cuda.matmul.allow_tf32 = False
    check.peaks["fp32"] = matmul_tflops(torch.float32, check.device, n, reps=3)
    return {"peak_bf16_tflops": check.peaks["bf16"], "peak_fp32_tflops": check.peaks["fp32"]}


def train_speed(check: Check, name: str, compile_mode: str) -> dict:
    """ms/step, tokens/s and MFU of `steps` training steps after 5 warm-up steps (which compile)."""
    from lmzoo.training.setup import setup_training

    setup = setup_training(check.config(name, [f"train.compile={compile_mode}"]))
    start = time.perf_counter()
    for _ in range(5):
        setup.stepper(1e-4)
    sync()
    warmup = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    results = [setup.stepper(1e-4) for _ in range(check.steps)]
    sync()
    seconds = (time.perf_counter() - start) / check.steps
    config = setup.run.config
    tokens = sum(r.tokens for r in results) / len(results)
    batch = setup.stepper.batches.next()
    flops = 3 * setup.model.flops_per_token(config.seq_len, batch[1]) * tokens
    tflops = flops / seconds / 1e12
    return {
        "config": name,
        "compile": compile_mode,
        "precision": setup.precision,
        "ms_per_step": seconds * 1e3,
        "tok_s": tokens / seconds,
        "tflops": tflops,
        "mfu": tflops / check.peaks["bf16"] if check.peaks.get("bf16") else None,
        "warmup_s": warmup,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "last_loss": float(results[-1].loss),
    }


def part_train(check: Check, name: str = "gpt_gpu") -> list[dict]:
    rows = []
    for mode in ("false", "default", "reduce-overhead"):
        row = guarded(lambda mode=mode: train_speed(check, name, mode), {"config": name, "compile": mode})
        if "tok_s" in row and name == "gpt_gpu":
            row["vs_nanogpt"] = row["tok_s"] / NANOGPT["tok_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def part_quality(check: Check) -> dict:
    """Train gpt_gpu.yaml as shipped (early stopping); the wall time and the time to the best val loss."""
    from lmzoo.run import Run
    from lmzoo.training.loop import train

    config = check.config("gpt_gpu", ["name=gpu_check_quality"])
    start = time.perf_counter()
    run_dir = train(config, progress=False)
    wall = time.perf_counter() - start
    records = Run.open(run_dir).metrics()
    began = next(r["time"] for r in records if r.get("event") == "start")
    evals = [r for r in records if "val/loss" in r]
    best = min(evals, key=lambda r: float(r["val/loss"]))
    return {
        "wall_s": wall,
        "steps": max(r["step"] for r in records),
        "max_steps": config.train.max_steps,
        "best_val_loss": float(best["val/loss"]),
        "best_step": best["step"],
        "time_to_best_s": best["time"] - began,
        "nanogpt_wall_s": NANOGPT["wall_s"],
        "third_of_nanogpt_s": NANOGPT["wall_s"] / 3,
        "evals": len(evals),
    }


def part_seq2seq(check: Check) -> dict:
    """transformer.yaml with token batches: tokens/s, then a timed run and its test BLEU."""
    from lmzoo.run import Run
    from lmzoo.training.loop import train

    speed = train_speed(check, "transformer", "false")
    print(json.dumps({"seq2seq_speed": speed}), flush=True)
    steps = max(10, int(check.seq2seq_minutes * 60e3 / speed["ms_per_step"]))
    extra = ["name=gpu_check_seq2seq", f"train.max_steps={steps}", f"train.eval_every={steps}"]
    extra += ["train.best_metric=loss", "train.bleu_sentences=0", "train.eval_batches=20"]
    if check.dry:
        extra.append(f"data.test={small_test_set(check.workdir)}")
    start = time.perf_counter()
    run_dir = train(check.config("transformer", extra), progress=False)
    wall = time.perf_counter() - start
    run = Run.open(run_dir)
    scores = run.evaluate(split="test", beam=5, checkpoint_tag="last", device=check.device)
    return {"steps": steps, "train_wall_s": wall, "tok_s": speed["tok_s"], "test": scores}


def small_test_set(workdir: Path, lines: int = 8) -> Path:
    """The first test pairs, for a dry run's BLEU (decoding 1000 sentences on a CPU takes long)."""
    from lmzoo.config.schema import resolve_data_path

    prefix = workdir / "small_test"
    for side in ("de", "en"):
        text = resolve_data_path(f"lmzoo:tatoeba_deu_eng/test.{side}").read_text(encoding="utf-8")
        Path(f"{prefix}.{side}").write_text("".join(text.splitlines(keepends=True)[:lines]), encoding="utf-8")
    return prefix


def part_decode(check: Check) -> dict:
    from bench import gpt_generation

    size = {"model_config": "gpt", "context": 64, "new_tokens": 96} if check.dry else {}
    return gpt_generation(device=check.device, **size)


def part_lora(check: Check) -> dict:
    from lmzoo.config.schema import FinetuneConfig
    from lmzoo.models import build_model
    from lmzoo.models.peft import apply_finetune

    torch.manual_seed(0)
    section = {"name": "lstm", "embedding_dim": 32, "hidden_size": 64, "num_layers": 2, "dropout": 0.0}
    model = build_model(section, 50).to(check.device)
    ids = torch.randint(4, 50, (4, 20), device=check.device)
    before, _ = model(ids)
    apply_finetune(model, FinetuneConfig(method="lora"))  # the model's default targets: W_ih, W_hh
    same_at_start = torch.allclose(model(ids)[0], before, atol=1e-5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = model(ids, targets=ids)
    loss.backward()
    grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    return {
        "same_at_start": same_at_start,
        "changed_after_step": not torch.allclose(model(ids)[0], before, atol=1e-4),
        "lora_tensors": len(grads),
        "B_grads_nonzero": all(v > 0 for n, v in grads.items() if n.endswith(".B")),
        "frozen_have_no_grad": all(p.grad is None for p in model.parameters() if not p.requires_grad),
        "cudnn": torch.backends.cudnn.is_available(),
    }


def part_attention(check: Check) -> list[dict]:
    """ms/step with and without cuDNN's attention, interleaved in one process (lmzoo.models.attention)."""
    from lmzoo.models import attention
    from lmzoo.training.setup import setup_training

    rows = []
    for name in ("transformer", "gpt_gpu"):
        setup = setup_training(check.config(name, ["train.compile=false"]))
        for cudnn in (False, True, False):  # lmzoo's choice twice: the first also warms up
            attention.CUDA_CUDNN_ATTENTION = cudnn
            for _ in range(10):
                setup.stepper(1e-4)
            sync()
            start = time.perf_counter()
            tokens = sum(setup.stepper(1e-4).tokens for _ in range(check.steps))
            sync()
            seconds = time.perf_counter() - start
            row = {"config": name, "cudnn_attention": cudnn, "ms_per_step": seconds / check.steps * 1e3}
            rows.append({**row, "tok_s": tokens / seconds})
            print(json.dumps(rows[-1]), flush=True)
    attention.CUDA_CUDNN_ATTENTION = False
    return rows


def guarded(run: Callable[[], object], label: dict) -> dict:
    """A part's result, or its error: one failure must not hide the other figures."""
    try:
        result = run()
        return result if isinstance(result, dict) else {"rows": result}
    except Exception as err:
        return {**label, "error": f"{type(err).__name__}: {err}"[:400]}


PARTS: dict[str, Callable[[Check], object]] = {
    "peak": part_peak,
    "train": part_train,
    "modern": lambda check: part_train(check, "modern_gpu"),
    "quality": part_quality,
    "seq2seq": part_seq2seq,
    "decode": part_decode,
    "lora": part_lora,
    "attention": part_attention,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per measurement")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--seq2seq-minutes", type=float, default=3.0, help="length of the seq2seq run")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: check the script runs")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; parts: {', '.join(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(
            "no CUDA device: this script checks the GPU path (--dry-run runs it on the CPU at tiny sizes)"
        )
    steps = min(args.steps, 5) if args.dry_run else args.steps
    if args.dry_run:  # compile through dynamo only: inductor's C++ build would take minutes on a CPU
        real = torch.compile
        torch.compile = lambda model, mode=None, **kw: real(model, **{**kw, "backend": "eager"})
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        check = Check(args.dry_run, steps, Path(workdir), 0.05 if args.dry_run else args.seq2seq_minutes, {})
        name = (
            torch.cuda.get_device_name()
            if torch.cuda.is_available() and not args.dry_run
            else "cpu (dry run)"
        )
        report: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(report), flush=True)
        for part in parts:
            started = time.perf_counter()
            report[part] = guarded(lambda part=part: PARTS[part](check), {"part": part})
            if isinstance(report[part], dict):
                report[part]["part_s"] = time.perf_counter() - started
            print(json.dumps({part: report[part]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
