"""Build the preference pairs that configs/gpt_dpo.yaml trains on, from Tiny Shakespeare.

Each pair is a passage (the prompt), its true continuation (chosen) and a worse continuation
(rejected). With --rejected corrupted (the default) the rejected text is the true continuation
with a quarter of its letters replaced by random ones: a model that learns the preference has
learned to prefer well-formed text to misspelt text in context. With --rejected foreign it is the
continuation of another, random passage: the model must learn what follows from its context,
which a 4-layer character model learns only partly. Train pairs come from the corpus's training
lines, held-out pairs from its validation lines (the 90/10 split of configs/gpt.yaml), so no
held-out passage was seen in pre-training or preference training.

    python scripts/make_preferences.py            # writes lmzoo/corpora/preferences/{train,heldout}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "lmzoo" / "corpora" / "tinyshakespeare.txt"
OUT = ROOT / "lmzoo" / "corpora" / "preferences"


def corrupt(text: str, rate: float, rng: random.Random) -> str:
    """Replace about `rate` of the letters with other random lowercase letters (spacing kept)."""
    out = []
    for ch in text:
        if ch.isalpha() and rng.random() < rate:
            out.append(rng.choice([c for c in string.ascii_lowercase if c != ch.lower()]))
        else:
            out.append(ch)
    return "".join(out)


def pairs(
    text: str, count: int, prompt_chars: int, response_chars: int, rejected: str, rng: random.Random
) -> list[dict]:
    """`count` pairs cut at random places of `text` (newlines kept: they are part of the verse)."""
    span = prompt_chars + response_chars
    records = []
    while len(records) < count:
        start = rng.randrange(len(text) - span)
        prompt = text[start : start + prompt_chars]
        chosen = text[start + prompt_chars : start + span]
        if rejected == "corrupted":
            worse = corrupt(chosen, 0.25, rng)
        else:
            other = rng.randrange(len(text) - span)
            while abs(other - start) < span:
                other = rng.randrange(len(text) - span)
            worse = text[other + prompt_chars : other + span]
        if worse != chosen:
            records.append({"prompt": prompt, "chosen": chosen, "rejected": worse})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--prompt-chars", type=int, default=40)
    parser.add_argument("--response-chars", type=int, default=20)
    parser.add_argument("--rejected", choices=["corrupted", "foreign"], default="corrupted")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = round(len(lines) * 0.9)  # configs/gpt.yaml's split: train lines, then validation lines
    rng = random.Random(args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text, count in (
        ("train", "".join(lines[:cut]), args.train),
        ("heldout", "".join(lines[cut:]), args.heldout),
    ):
        records = pairs(text, count, args.prompt_chars, args.response_chars, args.rejected, rng)
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{OUT / f'{name}.jsonl'}: {len(records)} pairs")


if __name__ == "__main__":
    main()
