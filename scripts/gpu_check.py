"""One prepared check of lmzoo's CUDA path, for a machine with an NVIDIA GPU (no network needed).

    python scripts/gpu_check.py [--steps 60] [--json out.json]

1. the card's measured bf16 (and tf32/fp32) matmul peak (8192^3),
2. configs/gpt_gpu.yaml trained for a fixed number of steps in fp32, bf16, and bf16 + torch.compile:
   tokens/s and model FLOP/s as a fraction of the measured bf16 peak (MFU),
3. generation with and without the KV cache at context 256,
4. LoRA on an LSTM's recurrent weights on CUDA: gradients reach A and B and one step changes the output.

The CUDA-marked tests are run separately: `pytest -m cuda`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def matmul_tflops(dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def train_speed(precision: str, compile_model: bool, steps: int) -> dict:
    from lmzoo.run import load_config
    from lmzoo.train import setup_training

    overrides = [
        f"train.precision={precision}",
        f"train.compile={str(compile_model).lower()}",
        "train.device=cuda",
    ]
    config = load_config(ROOT / "configs" / "gpt_gpu.yaml", overrides)
    setup = setup_training(config)
    start = time.perf_counter()
    for _ in range(5):  # warm-up (and compilation)
        setup.stepper(1e-4)
    torch.cuda.synchronize()
    warmup = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(setup.stepper(1e-4).loss)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tokens = config.data.batch_size * config.seq_len
    _, y, _ = setup.stepper.batches.next()
    flops = 3 * setup.model.flops_per_token(config.seq_len, y) * tokens
    return {
        "precision": precision,
        "compile": compile_model,
        "tok_s": tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "ms_per_step": seconds * 1e3,
        "warmup_s": warmup,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
        "last_loss": losses[-1],
    }


def generation_speed() -> dict:
    from bench import gpt_generation

    gpt_generation(new_tokens=32, device="cuda")  # warm-up
    return gpt_generation(device="cuda")


def lstm_lora_on_cuda() -> dict:
    from lmzoo.config.schema import FinetuneConfig
    from lmzoo.models import build_model
    from lmzoo.peft import apply_finetune

    torch.manual_seed(0)
    model = build_model(
        {"name": "lstm", "embedding_dim": 32, "hidden_size": 64, "num_layers": 2, "dropout": 0.0}, 50
    ).cuda()
    ids = torch.randint(4, 50, (4, 20), device="cuda")
    before, _ = model(ids)
    apply_finetune(model, FinetuneConfig(method="lora"))  # the model's default targets: W_ih, W_hh
    same_at_start = torch.allclose(model(ids)[0], before, atol=1e-5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = model(ids, targets=ids)
    loss.backward()
    grads = {n: float(p.grad.abs().sum()) for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    changed = not torch.allclose(model(ids)[0], before, atol=1e-4)
    frozen_untouched = all(p.grad is None for p in model.parameters() if not p.requires_grad)
    return {
        "same_at_start": same_at_start,
        "changed_after_step": changed,
        "lora_tensors": len(grads),
        "B_grads_nonzero": all(v > 0 for n, v in grads.items() if n.endswith(".B")),
        "frozen_have_no_grad": frozen_untouched,
        "cudnn": torch.backends.cudnn.is_available(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script checks the GPU path")
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["peak_bf16_tflops"] = matmul_tflops(torch.bfloat16)
    torch.backends.cuda.matmul.allow_tf32 = False
    report["peak_fp32_tflops"] = matmul_tflops(torch.float32, reps=3)
    print(json.dumps(report), flush=True)
    report["train"] = []
    for precision, compiled in (("fp32", False), ("bf16", False), ("bf16", True)):
        try:
            row = train_speed(precision, compiled, args.steps)
            row["mfu_vs_bf16_peak"] = row["tflops"] / report["peak_bf16_tflops"]
        except Exception as err:  # report and go on: one failure should not hide the other figures
            row = {"precision": precision, "compile": compiled, "error": f"{type(err).__name__}: {err}"[:300]}
        report["train"].append(row)
        print(json.dumps(row), flush=True)
    for name, check in (("generation", generation_speed), ("lstm_lora", lstm_lora_on_cuda)):
        try:
            report[name] = check()
        except Exception as err:
            report[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
        print(json.dumps({name: report[name]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
