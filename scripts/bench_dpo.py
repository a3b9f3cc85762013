"""The lecture's DPO job on a CPU, lmzoo against TRL's DPOTrainer: seconds per preference pair, peak
memory and held-out reward accuracy.

    python scripts/bench_dpo.py prepare                  # the checkpoint, the pairs, lmzoo's import of it
    python scripts/bench_dpo.py ratio --steps 30         # both jobs in one process, steps interleaved
    python scripts/bench_dpo.py rss --job lmzoo          # one job alone in this process: its peak RSS
    python scripts/bench_dpo.py rss --job trl

The same job on both sides: the model (a GPT-2-small-shaped checkpoint, transformers' GPT2Config() with
random weights, built here with transformers: there is no network), its tokenizer (byte-level BPE fitted
on Tiny Shakespeare, GPT-2's 50257 embedding rows), the pairs (Tiny Shakespeare passages cut at word
boundaries, the true continuation chosen, a copy with a quarter of its letters garbled rejected; both
sides tokenize them to the same ids, which `ratio` checks), LoRA (rank, alpha, no dropout, on the
attention's Q/K/V and output projections), batch, maximum length, beta, AdamW (constant learning rate,
no weight decay, betas 0.9/0.999, gradient clipping at 1), steps and precision. Dropout is off on both
sides (TRL's default). Neither side evaluates during the timed steps.

`ratio` runs TRL's own trainer.train() with one lmzoo step after each of its steps (a callback), timing
each step of each, so drift on a shared machine hits both. It scores the held-out pairs with each
policy and its reference (LoRA switched off) in fp32, by one function, after an early step and at the
end: the reward accuracy is the share of pairs whose chosen response gains more log-probability over
the reference than the rejected one. `rss` runs one job alone (its peak resident memory, the libraries
it imports included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import statistics
import string
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "lmzoo" / "corpora" / "tinyshakespeare.txt"
LORA_TARGETS = {"lmzoo": ["*attn.in_proj.weight", "*attn.out_proj.weight"], "trl": ["c_attn", "attn.c_proj"]}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "beta": args.beta,
        "rank": 8,
        "alpha": 16,
        "max_length": 128,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "seed": 0,
        "early": args.early,
    }


# ---- the shared inputs -----------------------------------------------------------------------------


def corrupt(text: str, rng: random.Random) -> str:
    """A quarter of the letters replaced by other random letters (spacing and punctuation kept)."""
    return "".join(
        rng.choice([c for c in string.ascii_lowercase if c != ch.lower()])
        if ch.isalpha() and rng.random() < 0.25
        else ch
        for ch in text
    )


def word_pairs(text: str, count: int, rng: random.Random) -> list[dict[str, str]]:
    """Pairs cut at spaces: the prompt ends on a word, the response starts with " word", so tokenizing
    prompt + response together gives the prompt's tokens then the response's (as TRL tokenizes them)."""
    records: list[dict[str, str]] = []
    while len(records) < count:
        start = text.find(" ", rng.randrange(len(text) - 400)) + 1
        cut = text.find(" ", start + 120)
        end = text.find(" ", cut + 60)
        prompt, chosen = text[start:cut], text[cut:end]
        if "\n " in chosen or not chosen[1:2].isalpha() or not prompt[-1:].isalnum():
            continue
        rejected = corrupt(chosen, rng)
        if rejected != chosen:
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def prepare(work: Path) -> None:
    """GPT-2-small-shaped checkpoint with random weights and a fitted tokenizer, the pairs, lmzoo's import."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = CORPUS.read_text(encoding="utf-8")
    folder = work / "gpt2-small-random"
    if not (folder / "model.safetensors").is_file():
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=50257,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator([text], trainer=trainer)
        end = backend.token_to_id("<|endoftext|>")
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(bos_token_id=end, eos_token_id=end))  # GPT-2 small's shape
        model.save_pretrained(folder)
        names = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        PreTrainedTokenizerFast(tokenizer_object=backend, **names).save_pretrained(folder)
    split = int(len(text) * 0.9)
    rng = random.Random(0)
    for name, part, count in (("train", text[:split], 2000), ("heldout", text[split:], 200)):
        path = work / f"{name}.jsonl"
        if not path.is_file():
            path.write_text(
                "".join(json.dumps(r) + "\n" for r in word_pairs(part, count, rng)), encoding="utf-8"
            )
    if not (work / "runs" / "gpt2-small").is_dir():
        from lmzoo.interop import import_pretrained

        import_pretrained(folder, work / "runs" / "gpt2-small")
    print(f"prepared {work}: {folder.name}, train.jsonl, heldout.jsonl, runs/gpt2-small", file=sys.stderr)


def read_pairs(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- the two jobs, one optimiser step at a time ----------------------------------------------------


class LmzooJob:
    """lmzoo's DPO task as `lmzoo train` builds it (configs/dpo_gpt2.yaml's settings), stepped by hand."""

    name = "lmzoo"

    def __init__(self, work: Path, s: dict[str, Any]) -> None:
        from lmzoo.run import resolve_config
        from lmzoo.training.setup import setup_training

        raw = {
            "name": "dpo_gpt2_bench",
            "out_dir": str(work / "runs"),
            "seed": s["seed"],
            "init_from": str(work / "runs" / "gpt2-small"),
            "data": {
                "format": "preference",
                "train": str(work / "train.jsonl"),
                "val": str(work / "heldout.jsonl"),
                "batch_size": s["batch"],
            },
            "finetune": {
                "method": "lora",
                "r": s["rank"],
                "alpha": s["alpha"],
                "targets": LORA_TARGETS["lmzoo"],
            },
            "train": {
                "max_steps": s["steps"],
                "lr": s["lr"],
                "schedule": "constant",
                "warmup_steps": 0,
                "weight_decay": 0.0,
                "betas": [0.9, 0.999],
                "grad_clip": 1.0,
                "dpo_beta": s["beta"],
                "precision": s["precision"],
                "device": "cpu",
            },
        }
        self.config = resolve_config(raw)
        self.setup = setup_training(self.config)
        self.model = self.setup.model
        self.tokenizer = self.setup.task.tokenizer
        self.losses: list[float] = []

    def step(self) -> None:
        result = self.setup.stepper(self.config.train.lr)
        self.losses.append(float(result.loss))

    def logprobs(self, pairs: list[tuple[list[int], list[int]]], reference: bool) -> torch.Tensor:
        """Sum of response-token log-probabilities (fp32) of each (prompt ids, response ids) sequence."""
        import contextlib

        from lmzoo.models.peft import adapters_disabled

        switch = adapters_disabled(self.model) if reference else contextlib.nullcontext()
        with torch.no_grad(), switch, evaluating(self.model):
            # lmzoo ids: the checkpoint's + 1 (the <pad> slot in front); its logits over them
            return response_logprobs(lambda ids: self.model(ids + 1)[0][..., 1:], pairs)


class TrlJob:
    """TRL's DPOTrainer with a PEFT LoRA adapter, run by its own trainer.train() as the lecture runs it."""

    name = "trl"

    def __init__(self, work: Path, s: dict[str, Any]) -> None:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        folder = work / "gpt2-small-random"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        args = DPOConfig(
            output_dir=str(work / "trl"),
            per_device_train_batch_size=s["batch"],
            max_steps=s["steps"],
            learning_rate=s["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            max_grad_norm=1.0,
            beta=s["beta"],
            max_length=s["max_length"],
            bf16=s["precision"] == "bf16",
            use_cpu=True,
            seed=s["seed"],
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
        )
        lora = LoraConfig(
            r=s["rank"],
            lora_alpha=s["alpha"],
            lora_dropout=0.0,
            target_modules=LORA_TARGETS["trl"],
            fan_in_fan_out=True,  # GPT-2's Conv1D stores weights (in, out)
            bias="none",
            task_type="CAUSAL_LM",
        )
        dataset = Dataset.from_list(read_pairs(work / "train.jsonl"))
        self.trainer = DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=self.tokenizer, peft_config=lora
        )
        self.model = self.trainer.model

    def train(self, between_steps: Any = None) -> list[float]:
        """trainer.train(), as the lecture runs it; `between_steps()` runs after each step, outside the time
        counted for TRL. Returns TRL's seconds per step (step start to next step start, less that call)."""
        from transformers import TrainerCallback

        marks: list[float] = []
        outside: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                marks.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                if between_steps is not None:
                    start = time.perf_counter()
                    between_steps()
                    outside.append(time.perf_counter() - start)

            def on_train_end(self, args, state, control, **kwargs):
                marks.append(time.perf_counter())

        self.trainer.add_callback(Clock())
        self.trainer.train()
        spans = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        return [span - (outside[i] if i < len(outside) else 0.0) for i, span in enumerate(spans)]

    def logprobs(self, pairs: list[tuple[list[int], list[int]]], reference: bool) -> torch.Tensor:
        import contextlib

        switch = self.model.disable_adapter() if reference else contextlib.nullcontext()
        with torch.no_grad(), switch, evaluating(self.model):
            return response_logprobs(lambda ids: self.model(input_ids=ids).logits, pairs)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off (there is none here) and back to the model's previous mode."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def response_logprobs(
    logits_of: Any, pairs: list[tuple[list[int], list[int]]], rows: int = 20
) -> torch.Tensor:
    """log p(response | prompt) of each pair, in fp32: `logits_of(ids (B, T)) -> (B, T, V)` in the
    checkpoint's ids, over right-padded batches (causal attention: padding after a sequence changes nothing
    before it)."""
    sums = []
    for start in range(0, len(pairs), rows):
        chunk = [prompt + response for prompt, response in pairs[start : start + rows]]
        width = max(len(ids) for ids in chunk)
        ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in chunk])
        logprobs = logits_of(ids[:, :-1]).float().log_softmax(-1)
        picked = logprobs.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1): log p(token t+1)
        for row, (prompt, response) in enumerate(pairs[start : start + rows]):
            end = len(prompt) + len(response) - 1
            sums.append(picked[row, end - len(response) : end].sum())
    return torch.stack(sums)


def tokenized_pairs(
    job: LmzooJob, records: list[dict[str, str]]
) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen + eos, rejected + eos) in the checkpoint's own ids, as both sides tokenize them."""
    tok = job.tokenizer
    eos = tok.eos_id - 1
    shifted = [
        ([i - 1 for i in tok.encode(r["prompt"])], [i - 1 for i in tok.encode(r["chosen"])] + [eos],
         [i - 1 for i in tok.encode(r["rejected"])] + [eos])
        for r in records
    ]  # fmt: skip
    return shifted


def check_same_tokens(lmzoo: LmzooJob, trl: TrlJob, records: list[dict[str, str]]) -> None:
    """TRL tokenizes prompt + response in one go; the pairs are cut so that this gives lmzoo's ids."""
    eos = trl.tokenizer.eos_token
    for (prompt, chosen, rejected), record in zip(tokenized_pairs(lmzoo, records), records, strict=True):
        joint = trl.tokenizer(record["prompt"] + record["chosen"] + eos, add_special_tokens=False)[
            "input_ids"
        ]
        other = trl.tokenizer(record["prompt"] + record["rejected"] + eos, add_special_tokens=False)[
            "input_ids"
        ]
        if joint != prompt + chosen or other != prompt + rejected:
            raise SystemExit(f"the two sides tokenize a pair differently: {record}")


class HeldOut:
    """Held-out reward accuracy of one job's policy: the share of pairs whose chosen response gains more
    log-probability over the reference (LoRA off) than the rejected one (ties count half)."""

    def __init__(self, job: LmzooJob | TrlJob, pairs: list[tuple[list[int], list[int], list[int]]]) -> None:
        self.job = job
        self.chosen = [(p, c) for p, c, _ in pairs]
        self.rejected = [(p, r) for p, _, r in pairs]
        self.reference = job.logprobs(self.chosen, True) - job.logprobs(self.rejected, True)

    def __call__(self) -> dict[str, float]:
        margin = (
            self.job.logprobs(self.chosen, False) - self.job.logprobs(self.rejected, False) - self.reference
        )
        accuracy = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
        return {"accuracy": accuracy, "margin": float(margin.mean())}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ratio(work: Path, s: dict[str, Any]) -> dict[str, Any]:
    """Both jobs in this process, one lmzoo step after each TRL step; held-out accuracy by one function after
    step `early` and at the end (outside the timed steps)."""
    torch.manual_seed(s["seed"])
    lmzoo, trl = LmzooJob(work, s), TrlJob(work, s)
    check_same_tokens(lmzoo, trl, read_pairs(work / "train.jsonl")[:200])
    heldout = tokenized_pairs(lmzoo, read_pairs(work / "heldout.jsonl"))
    scorers = {"lmzoo": HeldOut(lmzoo, heldout), "trl": HeldOut(trl, heldout)}
    accuracy: dict[str, dict[str, Any]] = {"lmzoo": {}, "trl": {}}
    lmzoo_times: list[float] = []

    def lmzoo_step() -> None:
        start = time.perf_counter()
        lmzoo.step()
        lmzoo_times.append(time.perf_counter() - start)
        if len(lmzoo_times) == s["early"]:
            for name, score in scorers.items():
                accuracy[name][f"after_step_{s['early']}"] = score()

    times = {"trl": trl.train(between_steps=lmzoo_step), "lmzoo": lmzoo_times}
    for name, score in scorers.items():
        accuracy[name][f"after_step_{s['steps']}"] = score()
    losses = {"lmzoo": lmzoo.losses, "trl": [r["loss"] for r in trl.trainer.state.log_history if "loss" in r]}
    result: dict[str, Any] = {"settings": s, "date": time.strftime("%Y-%m-%d")}
    for name in ("lmzoo", "trl"):
        steady = times[name][1:]  # the first step warms caches and allocators up
        result[name] = {
            "steps": len(times[name]),
            "seconds_per_pair": statistics.median(steady) / s["batch"],
            "seconds_per_pair_mean": statistics.fmean(steady) / s["batch"],
            "first_step_s": times[name][0],
            "heldout": accuracy[name],
            "step_seconds": [round(t, 3) for t in times[name]],
            "losses": [round(x, 4) for x in losses[name]],
        }
    result["speedup"] = result["trl"]["seconds_per_pair"] / result["lmzoo"]["seconds_per_pair"]
    return result


def rss(work: Path, s: dict[str, Any], name: str) -> dict[str, Any]:
    """One whole job alone in this process (lmzoo's task and steps, or TRL's trainer.train()): its peak RSS."""
    before = peak_rss_mb()
    start = time.perf_counter()
    if name == "lmzoo":
        job = LmzooJob(work, s)
        for _ in range(s["steps"]):
            job.step()
    else:
        TrlJob(work, s).train()
    return {
        "job": name,
        "settings": s,
        "peak_rss_mb": peak_rss_mb(),
        "rss_at_start_mb": before,
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["prepare", "ratio", "rss"])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_dpo")
    parser.add_argument("--job", choices=["lmzoo", "trl"], default="lmzoo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--early", type=int, default=2, help="ratio: also score the held-out pairs after this step"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "prepare":
        prepare(args.work)
        return
    s = settings(args)
    result = ratio(args.work, s) if args.what == "ratio" else rss(args.work, s, args.job)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
