"""An instruction suite a small model can learn: eight string and arithmetic tasks with a held-out split.

Every record is a plain instruct record {task, instruction, input, output}, the format `data.format:
instruct` reads, rendered with `data.template`. The tasks:

    reverse        Reverse the word.            kelpo       -> oplek
    upper          Write the word in capitals.  kelpo       -> KELPO
    sort_letters   Sort the letters.            kelpo       -> eklop
    sort_digits    Sort the digits.             40718       -> 01478
    add            Add the numbers.             52+41       -> 93
    subtract       Subtract the numbers.        152-41      -> 111
    count          Count the letters.           banana      -> 6
    copy           Copy the city.               name: ..., city: oslo, age: 31 -> oslo

Held-out inputs are never trained on: each word, digit string and number pair belongs to train or to
held-out by a hash of it and the seed, so the validation and test records ask about words and numbers
no training record contains. Everything is drawn from one seeded `random.Random`: the same seed writes
the same files, byte for byte.

Preference pairs come in two kinds, so a preference can be measured apart from correctness:
`correct` pairs set the answer against a plausibly wrong one (a digit off, two letters swapped), both in
the same style; `style` pairs set the answer with a final full stop against the same answer without.
SFT outputs end with a full stop only now and then (`style_share`), so a tuned model rarely adds it.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmzoo.config.schema import DataConfig
from lmzoo.errors import ConfigError
from lmzoo.inference.instructions import STYLE_SUFFIX
from lmzoo.io import atomic_write_text

TEMPLATE: str = DataConfig.model_fields["template"].default
LETTERS = string.ascii_lowercase
HELD_OUT_SHARE = 8  # one key in this many belongs to the held-out split
FIELDS = ("name", "city", "age")


@dataclass(frozen=True)
class Record:
    """One instruct record; `task` names the skill it tests."""

    task: str
    instruction: str
    input: str
    output: str

    @property
    def prompt_key(self) -> tuple[str, str]:
        return (self.instruction, self.input)


@dataclass(frozen=True)
class Drawn:
    """A task's draw: the record, the key that decides its split, and a plausibly wrong answer."""

    record: Record
    key: str
    wrong: str


def _held_out(key: str, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % HELD_OUT_SHARE == 0


def _word(rng: random.Random, low: int = 3, high: int = 6) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _swap_two(text: str, rng: random.Random) -> str:
    """`text` with two neighbouring, different characters swapped (itself when all are equal)."""
    spots = [i for i in range(len(text) - 1) if text[i] != text[i + 1]]
    if not spots:
        return text
    i = rng.choice(spots)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def _off_number(value: int, rng: random.Random) -> str:
    """A nearby wrong number: one or ten away, never negative, never the answer."""
    for step in rng.sample([1, -1, 10, -10], 4):
        if value + step >= 0:
            return str(value + step)
    return str(value + 1)


def _reverse(rng: random.Random) -> Drawn:
    word = _word(rng)
    answer = word[::-1]
    wrong = word if word != answer else _swap_two(answer, rng)
    return Drawn(Record("reverse", "Reverse the word.", word, answer), word, wrong)


def _upper(rng: random.Random) -> Drawn:
    word = _word(rng)
    i = rng.randrange(len(word))
    wrong = word.upper()[:i] + word[i] + word.upper()[i + 1 :]
    return Drawn(Record("upper", "Write the word in capitals.", word, word.upper()), word, wrong)


def _sort_letters(rng: random.Random) -> Drawn:
    word = _word(rng)
    answer = "".join(sorted(word))
    return Drawn(Record("sort_letters", "Sort the letters.", word, answer), word, _swap_two(answer, rng))


def _sort_digits(rng: random.Random) -> Drawn:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 6)))
    answer = "".join(sorted(digits))
    return Drawn(Record("sort_digits", "Sort the digits.", digits, answer), digits, _swap_two(answer, rng))


def _add(rng: random.Random) -> Drawn:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    question = f"{a}+{b}"
    return Drawn(Record("add", "Add the numbers.", question, str(a + b)), question, _off_number(a + b, rng))


def _subtract(rng: random.Random) -> Drawn:
    a = rng.randint(0, 199)
    b = rng.randint(0, min(a, 99))
    question = f"{a}-{b}"
    record = Record("subtract", "Subtract the numbers.", question, str(a - b))
    return Drawn(record, question, _off_number(a - b, rng))


def _count(rng: random.Random) -> Drawn:
    word = _word(rng, 3, 9)
    record = Record("count", "Count the letters.", word, str(len(word)))
    return Drawn(record, word, _off_number(len(word), rng))


def _copy(rng: random.Random) -> Drawn:
    values = {"name": _word(rng), "city": _word(rng), "age": str(rng.randint(1, 99))}
    wanted = rng.choice(FIELDS)
    text = ", ".join(f"{name}: {values[name]}" for name in FIELDS)
    other = rng.choice([name for name in FIELDS if name != wanted])
    # the key is the words of the record: a held-out record holds no word a training record holds
    key = f"{values['name']} {values['city']}"
    return Drawn(Record("copy", f"Copy the {wanted}.", text, values[wanted]), key, values[other])


TASKS: dict[str, Callable[[random.Random], Drawn]] = {
    "reverse": _reverse,
    "upper": _upper,
    "sort_letters": _sort_letters,
    "sort_digits": _sort_digits,
    "add": _add,
    "subtract": _subtract,
    "count": _count,
    "copy": _copy,
}
ARITHMETIC = ("add", "subtract")


def _split_keys(drawn: Drawn) -> list[str]:
    """Every key a record's split must agree on (the copy task holds two words)."""
    return drawn.key.split(" ") if drawn.record.task == "copy" else [drawn.key]


@dataclass
class SuiteSizes:
    """Records per task in each split, and preference pairs per task."""

    # 7,000 of the 8,750 sums a training record may ask (a + b with a, b < 100, one in 8 held out): with
    # 4,000, a model that has memorised the training sums can take thousands more steps to generalise
    train: int = 7000
    val: int = 50
    test: int = 100
    pairs_train: int = 1000
    pairs_val: int = 50
    pairs_test: int = 100


@dataclass
class Suite:
    """The generated records and preference pairs, split by split."""

    records: dict[str, list[Record]] = field(default_factory=dict)
    pairs: dict[str, list[dict[str, str]]] = field(default_factory=dict)


def _draw_split(
    rng: random.Random, task: str, count: int, *, held_out: bool, seed: int, taken: set[tuple[str, str]]
) -> list[Drawn]:
    """`count` draws of `task` whose keys all lie in the split, each prompt new to `taken`."""
    if count <= 0:
        return []
    found: list[Drawn] = []
    attempts = 0
    while len(found) < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise ConfigError(
                f"could not draw {count} distinct {task!r} records for a split; ask for fewer", param="sizes"
            )
        drawn = TASKS[task](rng)
        if any(_held_out(key, seed) != held_out for key in _split_keys(drawn)):
            continue
        if drawn.record.prompt_key in taken:
            continue
        taken.add(drawn.record.prompt_key)
        found.append(drawn)
    return found


def _pair(drawn: Drawn, rng: random.Random, template: str) -> dict[str, str]:
    """A preference pair: half `style` (answer with a final full stop over without), half `correct`."""
    record = drawn.record
    prompt = template.format(instruction=record.instruction, input=record.input)
    if rng.random() < 0.5:
        return {
            "task": record.task,
            "kind": "style",
            "prompt": prompt,
            "chosen": record.output + STYLE_SUFFIX,
            "rejected": record.output,
        }
    suffix = STYLE_SUFFIX if rng.random() < 0.5 else ""
    return {
        "task": record.task,
        "kind": "correct",
        "prompt": prompt,
        "chosen": record.output + suffix,
        "rejected": drawn.wrong + suffix,
    }


def make_suite(
    seed: int = 0,
    sizes: SuiteSizes | None = None,
    *,
    style_share: float = 0.25,
    template: str = TEMPLATE,
    tasks: tuple[str, ...] = tuple(TASKS),
) -> Suite:
    """Draw the suite: train/val/test records and train/val/test preference pairs, from `seed` alone.

    `style_share` of the training outputs end with a full stop; validation and test outputs never do
    (exact match ignores one final full stop, lmzoo.inference.instructions).
    """
    sizes = sizes or SuiteSizes()
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; known: {', '.join(TASKS)}", param="tasks")
    if not 0.0 <= style_share <= 1.0:
        raise ConfigError("style_share must lie between 0 and 1", param="style_share")
    rng = random.Random(seed)
    suite = Suite()
    plan = [
        ("train", False, sizes.train, sizes.pairs_train),
        ("val", True, sizes.val, sizes.pairs_val),
        ("test", True, sizes.test, sizes.pairs_test),
    ]
    taken: set[tuple[str, str]] = set()  # no prompt in two splits, nor twice in one
    for split, held_out, count, pair_count in plan:
        records: list[Record] = []
        pairs: list[dict[str, str]] = []
        for task in tasks:
            for drawn in _draw_split(rng, task, count, held_out=held_out, seed=seed, taken=taken):
                record = drawn.record
                if split == "train" and rng.random() < style_share:
                    record = Record(
                        record.task, record.instruction, record.input, record.output + STYLE_SUFFIX
                    )
                records.append(record)
            for drawn in _draw_split(rng, task, pair_count, held_out=held_out, seed=seed, taken=taken):
                pairs.append(_pair(drawn, rng, template))
        rng.shuffle(records)
        rng.shuffle(pairs)
        suite.records[split], suite.pairs[split] = records, pairs
    return suite


def unlabeled_text(records: list[Record], template: str = TEMPLATE) -> str:
    """The suite's unlabeled form for pre-training: each prompt as the template renders it, no answer."""
    return "".join(template.format(instruction=r.instruction, input=r.input) + "\n" for r in records)


def _jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_suite(
    out: str | Path,
    seed: int = 0,
    sizes: SuiteSizes | None = None,
    *,
    style_share: float = 0.25,
    template: str = TEMPLATE,
) -> dict[str, Path]:
    """Write the suite to `out`: {train,val,test}.jsonl, pairs_{train,val,test}.jsonl, unlabeled.txt
    (the training prompts without answers) and suite.json (how it was made). Returns the paths."""
    root = Path(out)
    suite = make_suite(seed, sizes, style_share=style_share, template=template)
    written: dict[str, Path] = {}
    for split, records in suite.records.items():
        written[split] = root / f"{split}.jsonl"
        atomic_write_text(written[split], _jsonl([asdict(r) for r in records]))
    for split, pairs in suite.pairs.items():
        written[f"pairs_{split}"] = root / f"pairs_{split}.jsonl"
        atomic_write_text(written[f"pairs_{split}"], _jsonl(pairs))
    written["unlabeled"] = root / "unlabeled.txt"
    atomic_write_text(written["unlabeled"], unlabeled_text(suite.records["train"], template))
    manifest = {
        "seed": seed,
        "sizes": asdict(sizes or SuiteSizes()),
        "style_share": style_share,
        "style_suffix": STYLE_SUFFIX,
        "template": template,
        "tasks": list(TASKS),
        "files": {name: path.name for name, path in written.items()},
    }
    written["manifest"] = root / "suite.json"
    atomic_write_text(written["manifest"], json.dumps(manifest, indent=2) + "\n")
    return written
