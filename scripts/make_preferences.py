"""Build the preference pairs that configs/gpt_dpo.yaml trains on, from Tiny Shakespeare.

Each pair is a passage (the prompt), its true continuation (chosen) and the continuation of a
different, random passage (rejected): a model that learns to prefer `chosen` has learned to
prefer text that follows from its context. Train pairs come from the corpus's training lines,
held-out pairs from its validation lines (the 90/10 split of configs/gpt.yaml), so no held-out
passage was seen in pre-training or preference training.

    python scripts/make_preferences.py            # writes lmzoo/corpora/preferences/{train,heldout}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "lmzoo" / "corpora" / "tinyshakespeare.txt"
OUT = ROOT / "lmzoo" / "corpora" / "preferences"


def pairs(text: str, count: int, prompt_chars: int, response_chars: int, rng: random.Random) -> list[dict]:
    """`count` pairs cut at random places of `text` (newlines kept: they are part of the verse)."""
    span = prompt_chars + response_chars
    starts = [rng.randrange(len(text) - span) for _ in range(count)]
    records = []
    for start in starts:
        other = rng.randrange(len(text) - span)
        while abs(other - start) < span:
            other = rng.randrange(len(text) - span)
        prompt = text[start : start + prompt_chars]
        chosen = text[start + prompt_chars : start + span]
        rejected = text[other + prompt_chars : other + span]
        if chosen != rejected:
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--prompt-chars", type=int, default=40)
    parser.add_argument("--response-chars", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = round(len(lines) * 0.9)  # configs/gpt.yaml's split: train lines, then validation lines
    rng = random.Random(args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text, count in (("train", "".join(lines[:cut]), args.train),
                              ("heldout", "".join(lines[cut:]), args.heldout)):
        records = pairs(text, count, args.prompt_chars, args.response_chars, rng)
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{OUT / f'{name}.jsonl'}: {len(records)} pairs")


if __name__ == "__main__":
    main()
