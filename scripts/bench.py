"""lmzoo benchmarks: training and generation speed, FLOP utilisation, peak memory.

    python scripts/bench.py                 # every row, markdown table on stdout
    python scripts/bench.py --rows word     # one group of rows (see ROW_GROUPS)
    python scripts/bench.py --steps 10      # quicker, noisier

Every speed is measured together with its baseline in the same process, interleaved (A, B, A, B),
so ratios hold on a noisy machine. Each row runs in its own subprocess so its peak memory is its
own. The machine's matmul peak (fp32 and bf16) is measured in the same run, and model FLOP/s are
reported as a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


# ---- measurement helpers -------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 30) -> float:
    """Best achieved GFLOP/s of an n x n x n matmul (the machine's practical peak for dtype)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    _sync()
    start = time.perf_counter()
    a @ b  # warm-up; a very slow dtype (bf16 emulated on CPUs without AVX512-BF16) gets fewer repeats
    _sync()
    best = time.perf_counter() - start
    for _ in range(min(reps, int(1.0 / best))):
        _sync()
        start = time.perf_counter()
        a @ b
        _sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline_flops_per_token(model: nn.Module) -> float:
    """Matmul FLOPs per token of a plain baseline written in this script (linear and LSTM layers only);
    lmzoo's own models count theirs through the model contract (`model.flops_per_token`)."""
    total = 0.0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.LSTM):
            for layer in range(module.num_layers):
                inputs = module.input_size if layer == 0 else module.hidden_size
                total += 2 * 4 * module.hidden_size * (inputs + module.hidden_size)
    return total


def interleaved(runners: dict[str, callable], rounds: int) -> dict[str, float]:
    """Median seconds per call of each runner, timed in alternation to cancel machine drift."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            _sync()
            start = time.perf_counter()
            run()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def load_setup(config_name: str, overrides: list[str] | None = None):
    from lmzoo.run import load_config
    from lmzoo.training.setup import setup_training

    config = load_config(CONFIGS / f"{config_name}.yaml", (overrides or []) + ["train.device=auto"])
    return config, setup_training(config)


def time_generation(
    model: nn.Module, tokenizer, n_tokens: int = 1000, repeats: int = 7
) -> tuple[float, float]:
    """Tokens/s over the first 100 and the last 100 of n_tokens new tokens (greedy, one prompt token).

    Each token's time is the median over `repeats` generations, and a window's speed is 1 / the
    median token time in it, so a scheduler hiccup does not pass for a cost that grows with length.
    """
    from lmzoo.inference.decoding import SamplingOptions, generate_ids

    model.eval()
    start_id = tokenizer.encode("\n")[0]
    list(generate_ids(model, [start_id], SamplingOptions(max_new_tokens=50, greedy=True)))  # warm-up
    options = SamplingOptions(max_new_tokens=n_tokens, greedy=True)
    runs = []
    for _ in range(repeats):
        stamps = [time.perf_counter()]
        for _ in generate_ids(model, [start_id], options):
            stamps.append(time.perf_counter())
        runs.append([b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)])
    per_token = [statistics.median(times) for times in zip(*runs, strict=True)]
    model.train()
    return 1 / statistics.median(per_token[:100]), 1 / statistics.median(per_token[n_tokens - 100 :])


# ---- rows ------------------------------------------------------------------------------------------


def row_recurrent(name: str, steps: int) -> dict:
    """Training tokens/s (fp32 and the default precision), MFU, generation speed, peak memory."""
    from lmzoo.device import pick_precision

    config, setup = load_setup(name)
    default_precision = pick_precision(setup.device, "auto")
    precisions = ["fp32"] + ([default_precision] if default_precision != "fp32" else [])
    result = {"row": name, "device": setup.device.type, "default_precision": default_precision}
    for precision in precisions:
        setup.stepper.precision = precision
        for _ in range(3):
            setup.stepper(1e-4)  # warm-up
        seconds = interleaved({"step": lambda: setup.stepper(1e-4)}, steps)["step"]
        tokens = config.data.batch_size * config.seq_len * config.train.grad_accum
        result[f"train_tok_s_{precision}"] = tokens / seconds
    _, y, _ = setup.stepper.batches.next()
    flops = 3 * setup.model.flops_per_token(config.seq_len, y)
    result["train_gflops_fp32"] = flops * result["train_tok_s_fp32"] / 1e9
    result["gen_tok_s_first100"], result["gen_tok_s_last100"] = time_generation(
        setup.model, setup.task.tokenizer
    )
    result["params"] = sum(p.numel() for p in setup.model.parameters())
    return result


class PlainWordLSTM(nn.Module):
    """The baseline: a plain full-softmax LSTM LM as in pytorch/examples' word_language_model."""

    def __init__(self, vocab: int, size: int = 200, layers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, size)
        self.rnn = nn.LSTM(size, size, layers, dropout=dropout)
        self.decoder = nn.Linear(size, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)  # (T, B, H)
        return self.decoder(self.drop(output)), hidden


def row_word(steps: int) -> dict:
    """lmzoo's word LSTM (configs/lstm_word.yaml) against the plain full-softmax fp32 step, same data."""
    config, setup = load_setup("lstm_word")
    vocab = setup.task.tokenizer.vocab_size
    torch.manual_seed(0)
    baseline = PlainWordLSTM(vocab).to(setup.device)
    optimizer = torch.optim.SGD(baseline.parameters(), lr=20.0)
    batches = setup.stepper.batches
    hidden = None

    def baseline_step() -> None:
        nonlocal hidden
        x, y, _ = batches.next()
        x, y = (
            x.t().contiguous().to(setup.device),
            y.t().contiguous().to(setup.device),
        )  # (T, B) like the original
        hidden = None if hidden is None else tuple(h.detach() for h in hidden)
        logits, hidden = baseline(x, hidden)
        loss = nn.functional.cross_entropy(logits.view(-1, vocab), y.view(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(baseline.parameters(), 0.25)
        optimizer.step()

    setup.stepper.precision = "fp32"
    for _ in range(3):
        baseline_step()
        setup.stepper(1e-4)
    seconds = interleaved({"baseline": baseline_step, "lmzoo": lambda: setup.stepper(1e-4)}, steps)
    tokens = config.data.batch_size * config.seq_len
    _, y, _ = batches.next()
    return {
        "row": "lstm_word",
        "device": setup.device.type,
        "vocab": vocab,
        "baseline_tok_s": tokens / seconds["baseline"],
        "lmzoo_tok_s": tokens / seconds["lmzoo"],
        "speedup": seconds["baseline"] / seconds["lmzoo"],
        "lmzoo_gflops": 3 * setup.model.flops_per_token(0, y) * tokens / seconds["lmzoo"] / 1e9,
        "baseline_gflops": 3 * baseline_flops_per_token(baseline) * tokens / seconds["baseline"] / 1e9,
    }


class PlainGPT(nn.Module):
    """The baseline: a straightforward fp32 GPT of the same shape as configs/gpt.yaml.

    Fused QKV projection, SDPA causal attention, GELU MLP, pre-LN without biases, tied output
    layer; trained with the default (unfused) AdamW, a batch stacked from slices every step and
    the loss read back every step: the plain recipe that lmzoo's step is compared against.
    """

    def __init__(self, vocab: int, d: int = 128, heads: int = 4, layers: int = 4, context: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d, bias=False),
                    "qkv": nn.Linear(d, 3 * d, bias=False),
                    "proj": nn.Linear(d, d, bias=False),
                    "ln2": nn.LayerNorm(d, bias=False),
                    "fc": nn.Linear(d, 4 * d, bias=False),
                    "out": nn.Linear(4 * d, d, bias=False),
                }
            )
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t = x.shape
        h = self.wte(x) + self.wpe(torch.arange(t))
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).split(h.shape[-1], dim=2)
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + blk["proj"](a.transpose(1, 2).reshape(b, t, -1))
            h = h + blk["out"](nn.functional.gelu(blk["fc"](blk["ln2"](h))))
        logits = self.lm_head(self.ln_f(h))
        return nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))


def row_gpt(steps: int) -> dict:
    """lmzoo configs/gpt.yaml step against the plain fp32 GPT step, on the same data, interleaved.

    Each lever is its own runner: fp32; the default precision; on a CPU with fast bf16 also bf16 with
    attention left in bf16 (lmzoo computes CPU attention in fp32 under bf16); and the compiled step.
    """
    from lmzoo.device import pick_precision

    config, setup = load_setup("gpt")
    vocab, stream = (
        setup.task.tokenizer.vocab_size,
        torch.from_numpy(setup.task.batches.stream.astype("int64")),
    )
    batch, seq = config.data.batch_size, config.seq_len
    torch.manual_seed(0)
    baseline = PlainGPT(vocab)
    optimizer = torch.optim.AdamW(baseline.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)

    def baseline_step() -> None:
        starts = torch.randint(len(stream) - seq, (batch,))
        x = torch.stack([stream[i : i + seq] for i in starts])
        y = torch.stack([stream[i + 1 : i + 1 + seq] for i in starts])
        loss = baseline(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(baseline.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    default = pick_precision(setup.device, "auto")
    runners = {"baseline": baseline_step, "lmzoo_fp32": lambda: _step_at(setup, "fp32")}
    if default == "bf16" and setup.device.type == "cpu":
        runners["lmzoo_bf16_attention_bf16"] = lambda: _step_with_bf16_attention(setup)
    if default != "fp32":
        runners[f"lmzoo_{default}"] = lambda: _step_at(setup, default)
    _, compiled = load_setup("gpt", [f"train.precision={default}", "train.compile=true"])
    runners[f"lmzoo_{default}_compiled"] = lambda: compiled.stepper(1e-4)
    warmup = {}
    for name, run in runners.items():
        start = time.perf_counter()
        for _ in range(3):
            run()
        warmup[name] = time.perf_counter() - start  # the compiled step's includes its compilation
    seconds = interleaved(runners, steps)
    tokens = batch * seq
    _, y, _ = setup.stepper.batches.next()
    flops = 3 * setup.model.flops_per_token(seq, y)  # the baseline is the same architecture: same FLOPs
    result = {
        "row": "gpt",
        "device": setup.device.type,
        "default_precision": default,
        "model_gflop_per_token": flops / 1e9,
        "variants": list(runners),
        "compile_warmup_s": warmup[f"lmzoo_{default}_compiled"],
    }
    for name, sec in seconds.items():
        result[f"{name}_tok_s"] = tokens / sec
        result[f"{name}_gflops"] = flops * tokens / sec / 1e9
    result["speedup"] = seconds["baseline"] / seconds[f"lmzoo_{default}"]
    result["speedup_compiled"] = seconds["baseline"] / seconds[f"lmzoo_{default}_compiled"]
    result.update(gpt_generation(device=str(setup.device)))
    return result


def _step_at(setup, precision: str) -> None:
    setup.stepper.precision = precision
    setup.stepper(1e-4)


def _step_with_bf16_attention(setup) -> None:
    """A bf16 step with attention in bf16 too: what lmzoo's fp32 attention on the CPU saves."""
    from lmzoo.models import attention

    attention.CPU_BF16_ATTENTION_IN_FP32 = False
    try:
        _step_at(setup, "bf16")
    finally:
        attention.CPU_BF16_ATTENTION_IN_FP32 = True


def gpt_generation(
    context: int = 256,
    new_tokens: int = 512,
    device: str = "cpu",
    caches: tuple[str, ...] = ("dynamic", "static", "compiled"),
    model_config: str = "gpt_gpu",
) -> dict:
    """Greedy decoding tokens/s at context 256 (gpt_gpu.yaml size) on `device`: the KV cache (dynamic,
    static, static with a compiled one-token step) against recomputing the whole window every token.
    512 new tokens: the window slides past the context, so the paths are also compared there."""
    from lmzoo.inference.decoding import SamplingOptions, generate_ids
    from lmzoo.models import build_model
    from lmzoo.run import load_config

    config = load_config(CONFIGS / f"{model_config}.yaml")
    torch.manual_seed(0)
    model = build_model(config.model, 69).to(device).eval()
    assert model.context_len == context
    options = SamplingOptions(max_new_tokens=new_tokens, greedy=True)
    result: dict = {}
    produced: dict[str, list[int]] = {}
    for cache in caches:
        start = time.perf_counter()
        list(generate_ids(model, [5], SamplingOptions(max_new_tokens=8, greedy=True), cache=cache))
        _sync()
        result[f"gen_warmup_s_{cache}"] = time.perf_counter() - start  # compiled: includes compiling
        start = time.perf_counter()
        produced[cache] = list(generate_ids(model, [5], options, cache=cache))
        _sync()
        result[f"gen_tok_s_{cache}"] = new_tokens / (time.perf_counter() - start)
        result[f"gen_same_tokens_{cache}"] = produced[cache] == produced[caches[0]]
    ids = torch.tensor([[5]], device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits, _ = model(ids[:, -context:])  # the whole window, every token
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    _sync()
    without_cache = new_tokens / (time.perf_counter() - start)
    first = produced[caches[0]]
    result.update(
        {
            "gen_tok_s_kv_cache": result[f"gen_tok_s_{caches[0]}"],
            "gen_tok_s_recompute": without_cache,
            "gen_cache_speedup": result[f"gen_tok_s_{caches[0]}"] / without_cache,
            "gen_same_tokens_within_context": ids[0, 1 : 1 + context].tolist() == first[:context],
        }
    )
    return result


def row_finetune(method: str, steps: int) -> dict:
    """Peak memory of fine-tuning a configs/gpt_gpu.yaml-sized GPT (batch 8): full vs LoRA vs adapters."""
    from lmzoo.config.schema import FinetuneConfig
    from lmzoo.device import pick_device
    from lmzoo.models import build_model
    from lmzoo.models.peft import apply_finetune, parameter_counts
    from lmzoo.run import load_config
    from lmzoo.training.optim import make_optimizer

    config = load_config(CONFIGS / "gpt_gpu.yaml")
    device = pick_device("auto")
    torch.manual_seed(0)
    model = build_model(config.model, 69).to(device)
    if method != "full":
        apply_finetune(model, FinetuneConfig(method=method))  # LoRA on the model's default targets
    optimizer = make_optimizer(model, config.train, device)
    batch, seq = 8, config.model.context_length
    x = torch.randint(4, 69, (batch, seq), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_mb()
    for _ in range(max(2, min(steps, 3))):
        loss, _ = model(x, targets=x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trainable, total = parameter_counts(model)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {
        "row": f"finetune_{method}",
        "device": device.type,
        "trainable": trainable,
        "total": total,
        "peak_mb": peak,
        "rss_before_mb": before,
    }


def row_tokenizers(steps: int) -> dict:
    """Seconds to encode a 1,000,000-character text with each tokenizer (fitted on Tiny Shakespeare)."""
    from lmzoo.data.corpus import read_text_file
    from lmzoo.data.tokenizer import TOKENIZER_REGISTRY, fit_tokenizer

    corpus = read_text_file("lmzoo:tinyshakespeare.txt")
    text = (corpus * 2)[:1_000_000]
    result = {"row": "tokenizers", "device": "cpu", "chars": len(text)}
    for kind, entry in TOKENIZER_REGISTRY.items():
        if not entry.cls.fits:  # a pretrained model's own tokenizer is imported, not fitted
            continue
        tokenizer = fit_tokenizer(entry.config(), corpus)
        start = time.perf_counter()
        ids = tokenizer.encode(text)
        result[f"{kind}_encode_s"] = time.perf_counter() - start
        result[f"{kind}_tokens"] = len(ids)
    return result


def row_decode(steps: int) -> dict:
    """Seq2seq decoding sentences/s, greedy and beam 5, on 200 test sentences, on the default device, with
    the trained runs runs/seq2seq and runs/transformer_small when they exist (else untrained models)."""
    from lmzoo.data.example_files import ExampleSplits
    from lmzoo.device import pick_device
    from lmzoo.inference.evaluate import translate_corpus
    from lmzoo.run import Run

    device = pick_device("auto")
    result: dict = {"row": "decode", "device": device.type}
    for name in ("seq2seq", "transformer_small"):
        run_dir = Path("runs") / name
        trained = (run_dir / "config.yaml").is_file()
        if trained:
            run = Run.open(run_dir)
            config, model = run.config, run.model("best", device)
            src_tok, tgt_tok = run.tokenizer, run.target_tokenizer
        else:
            config, setup = load_setup(name)
            model, src_tok, tgt_tok = setup.model.eval(), setup.task.tokenizer, setup.task.target_tokenizer
        result[f"{name}_trained"] = trained
        sources = [s for s, _ in ExampleSplits(config.data).split("test")[:200]]
        for label, beam in (("greedy", 1), ("beam5", 5)):
            start = time.perf_counter()
            translate_corpus(
                model, sources, src_tok, tgt_tok, max_len=config.data.max_len, beam=beam, device=device
            )
            _sync()
            result[f"{name}_{label}_sent_s"] = len(sources) / (time.perf_counter() - start)
    return result


ROWS = {
    "rnn": lambda steps: row_recurrent("rnn", steps),
    "lstm": lambda steps: row_recurrent("lstm", steps),
    "gru": lambda steps: row_recurrent("gru", steps),
    "word": row_word,
    "gpt": row_gpt,
    "finetune_full": lambda steps: row_finetune("full", steps),
    "finetune_lora": lambda steps: row_finetune("lora", steps),
    "finetune_adapter": lambda steps: row_finetune("adapter", steps),
    "tokenizers": row_tokenizers,
    "decode": row_decode,
}
ROW_GROUPS = {
    "recurrent": ["rnn", "lstm", "gru"],
    "finetune": ["finetune_full", "finetune_lora", "finetune_adapter"],
    "all": list(ROWS),
}


def run_row(name: str, steps: int) -> dict:
    """Run one row in a fresh interpreter so its peak memory is its own."""
    cmd = [sys.executable, __file__, "--one", name, "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        return {"row": name, "error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(peaks: dict, results: list[dict]) -> str:
    lines = [
        f"matmul peak (1024^3): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s "
        f"({peaks['device']}, {torch.get_num_threads()} threads, torch {torch.__version__})",
    ]
    if any(r["row"] in ROW_GROUPS["recurrent"] for r in results):
        lines += [
            "",
            "| row | train tok/s fp32 | train tok/s default | model GFLOP/s (fp32) | of fp32 peak | "
            "gen tok/s 1-100 | gen tok/s 901-1000 | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error']} |")
        elif r["row"] in ROW_GROUPS["recurrent"]:
            default = r.get(f"train_tok_s_{r['default_precision']}", r["train_tok_s_fp32"])
            lines.append(
                f"| {r['row']} | {r['train_tok_s_fp32']:,.0f} | {default:,.0f} ({r['default_precision']}) | "
                f"{r['train_gflops_fp32']:.1f} | {r['train_gflops_fp32'] / peaks['fp32']:.0%} | "
                f"{r['gen_tok_s_first100']:,.0f} | {r['gen_tok_s_last100']:,.0f} | {r['peak_rss_mb']:,.0f} |"
            )
    for r in results:
        if r.get("row") == "lstm_word" and "error" not in r:
            lines += [
                "",
                "| word LSTM 2x200, bptt 35, batch 20, vocab "
                f"{r['vocab']:,} | tokens/s | model GFLOP/s | of fp32 peak |",
                "|---|---|---|---|",
                f"| baseline: full softmax, fp32, SGD | {r['baseline_tok_s']:,.0f} | {r['baseline_gflops']:.1f} | "
                f"{r['baseline_gflops'] / peaks['fp32']:.0%} |",
                f"| lmzoo configs/lstm_word.yaml (adaptive softmax, fused AdamW) | {r['lmzoo_tok_s']:,.0f} | "
                f"{r['lmzoo_gflops']:.1f} | {r['lmzoo_gflops'] / peaks['fp32']:.0%} |",
                f"| speed-up | **{r['speedup']:.2f}x** | | |",
            ]
        if r.get("row") == "gpt" and "error" not in r:
            default = r["default_precision"]
            lines += [
                "",
                "| GPT 4x4x128, context 64, batch 12 (configs/gpt.yaml) | tokens/s | model GFLOP/s | of fp32 peak |",
                "|---|---|---|---|",
                f"| baseline: plain fp32 step | {r['baseline_tok_s']:,.0f} | {r['baseline_gflops']:.1f} | "
                f"{r['baseline_gflops'] / peaks['fp32']:.0%} |",
            ]
            for name in r.get("variants", [])[1:]:
                peak_name = "bf16" if "bf16" in name else "fp32"
                gflops = r[f"{name}_gflops"]
                lines.append(
                    f"| lmzoo, {name[6:].replace('_', ' ')} | {r[f'{name}_tok_s']:,.0f} "
                    f"({r[f'{name}_tok_s'] / r['baseline_tok_s']:.2f}x) | {gflops:.1f} | "
                    f"{gflops / peaks[peak_name]:.0%} of {peak_name} |"
                )
            lines += [
                f"| speed-up ({default}) | **{r['speedup']:.2f}x**, compiled **{r['speedup_compiled']:.2f}x** "
                f"(compile + 3 steps: {r['compile_warmup_s']:.0f} s) | | |",
                "",
                f"GPT decoding at context 256 (6x384 model), tok/s: KV cache {r['gen_tok_s_dynamic']:,.0f}, "
                f"static cache {r['gen_tok_s_static']:,.0f}, static + compiled step {r['gen_tok_s_compiled']:,.0f} "
                f"(compile {r['gen_warmup_s_compiled']:.0f} s), recomputing the window "
                f"{r['gen_tok_s_recompute']:,.0f}: **{r['gen_cache_speedup']:.1f}x** for the KV cache; same tokens "
                f"as the KV cache over 512 (past the context): static {r['gen_same_tokens_static']}, compiled "
                f"{r['gen_same_tokens_compiled']}; recompute within the context {r['gen_same_tokens_within_context']}",
            ]
    for r in results:
        if r.get("row") == "decode" and "error" not in r:
            lines += [
                "",
                "| seq2seq decoding, 200 test sentences | greedy sentences/s | beam 5 sentences/s |",
                "|---|---|---|",
            ]
            for name in ("seq2seq", "transformer_small"):
                note = "" if r[f"{name}_trained"] else " (untrained: decodes to max_len)"
                lines.append(
                    f"| {name}{note} | {r[f'{name}_greedy_sent_s']:.1f} | {r[f'{name}_beam5_sent_s']:.1f} |"
                )
        if r.get("row") == "tokenizers" and "error" not in r:
            lines += ["", f"| encoding {r['chars']:,} characters | seconds | tokens |", "|---|---|---|"]
            lines += [
                f"| {kind} | {r[f'{kind}_encode_s']:.2f} | {r[f'{kind}_tokens']:,} |"
                for kind in ("char", "word", "bpe")
            ]
    tuned = [r for r in results if r.get("row", "").startswith("finetune_") and "error" not in r]
    if tuned:
        full = next((r for r in tuned if r["row"] == "finetune_full"), tuned[0])
        memory = "peak GPU memory allocated" if full["device"] == "cuda" else "peak process RSS"
        lines += [
            "",
            f"| fine-tuning a 6x384 GPT (gpt_gpu.yaml size), batch 8x256 | trainable params | {memory} MB | vs full |",
            "|---|---|---|---|",
        ]
        for r in tuned:
            lines.append(
                f"| {r['row'][9:]} | {r['trainable']:,} of {r['total']:,} ({r['trainable'] / r['total']:.1%}) | "
                f"{r['peak_mb']:,.0f} | {r['peak_mb'] / full['peak_mb']:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="all", help=f"row or group: {', '.join([*ROW_GROUPS, *ROWS])}")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = ROWS[args.one](args.steps)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    names = ROW_GROUPS.get(args.rows, [args.rows])
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r}")
    peaks = {
        "fp32": matmul_peak(torch.float32),
        "bf16": matmul_peak(torch.bfloat16),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    results = [run_row(name, args.steps) for name in names]
    print(format_table(peaks, results))
    if args.json:
        args.json.write_text(json.dumps({"peaks": peaks, "results": results}, indent=1))


if __name__ == "__main__":
    main()
