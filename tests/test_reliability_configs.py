"""The reliability suite, part 3: every config mistake ends in one clear error line, with trial counts.

pytest -m reliability
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import yaml
from conftest import config_from_dict, run_trials
from typer.testing import CliRunner

from lmzoo.cli import app
from lmzoo.errors import ConfigError
from lmzoo.run import load_config
from lmzoo.run.config import config_to_yaml

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parent.parent
# Configs that start from a Hugging Face folder (init_from: hf:DIR) need that folder; their import is
# tested in tests/test_interop_import.py.
CONFIGS = sorted(
    path
    for path in (ROOT / "configs").glob("*.yaml")
    if not str((yaml.safe_load(path.read_text()) or {}).get("init_from", "")).startswith("hf:")
)


def one_error_line(result) -> str:
    """The CLI's answer to a user error: exit code 2 and one `error:` line, no traceback."""
    message = (getattr(result, "stderr", "") or result.output).strip()
    assert result.exit_code == 2, (result.exit_code, message[-500:], result.exception)
    assert message.count("\n") == 0 and message.startswith("error:") and "Traceback" not in message, message
    return message


# ---- config fuzzing -------------------------------------------------------------------------------


def prepared_configs(tmp_path: Path) -> list[Path]:
    """Every shipped config, copied where its init_from base run and data files exist."""
    runs = tmp_path / "runs"
    for base in ("gpt", "lstm", "gpt_bpe"):
        (runs / base).mkdir(parents=True, exist_ok=True)
        (runs / base / "config.yaml").write_text(
            config_to_yaml(load_config(ROOT / "configs" / f"{base}.yaml"))
        )
    copies = []
    for config in CONFIGS:
        target = tmp_path / config.name
        target.write_text(config.read_text())
        copies.append(target)
    return copies


def known_keys(raw: dict) -> dict[str, list[str]]:
    """Section -> its valid keys ("" for the top level), from the validated config (defaults included)."""
    data = config_from_dict(raw).to_dict()
    keys = {section: list(value) for section, value in data.items() if isinstance(value, dict)}
    keys[""] = list(data)
    return keys


def misspell(word: str, rng: random.Random) -> str:
    position = rng.randrange(len(word))
    kind = rng.choice(["delete", "swap", "replace"]) if len(word) > 2 else "replace"
    if kind == "delete":
        return word[:position] + word[position + 1 :]
    if kind == "swap" and position < len(word) - 1 and word[position] != word[position + 1]:
        return word[:position] + word[position + 1] + word[position] + word[position + 2 :]
    letters = [c for c in string.ascii_lowercase if c != word[position]]
    return word[:position] + rng.choice(letters) + word[position + 1 :]


def mutate(raw: dict, rng: random.Random, kind: str) -> tuple[str, str]:
    """Apply one invalid mutation; return (YAML text, the key path the error must name)."""
    raw = json.loads(json.dumps(raw))
    sections = known_keys(raw)
    if kind == "bad yaml":
        return yaml.safe_dump(raw) + "model: [unclosed\n", "line"
    if kind == "missing section":
        for section in ("model", "init_from", "finetune"):  # a fine-tune's model comes from its init_from run
            raw.pop(section, None)
        return yaml.safe_dump(raw), "model"
    if kind == "missing file":
        raw.setdefault("data", {})["train"] = "no/such/corpus.txt"
        return yaml.safe_dump(raw), "data.train"
    section = rng.choice(["data", "train", "sample", "model"])
    raw.setdefault(section, {})
    if kind == "misspelt key":
        key = rng.choice(sections[section])
        wrong = misspell(key, rng)
        while wrong in sections[section] or not wrong:
            wrong = misspell(key, rng)
        raw[section][wrong] = raw[section].pop(key, 1)
        return yaml.safe_dump(raw), f"{section}.{wrong}"
    if kind == "wrong type":
        key = rng.choice(
            [
                k
                for k in (
                    "batch_size",
                    "max_len",
                    "max_steps",
                    "lr",
                    "eval_every",
                    "max_new_tokens",
                    "temperature",
                )
                if k in sections[section]
            ]
            or ["batch_size"]
        )
        section = section if key in sections[section] else "data"
        raw.setdefault(section, {})[key] = rng.choice(["lots", [1, 2], {"a": 1}])
        return yaml.safe_dump(raw), f"{section}.{key}"
    if kind == "negative size":
        key = rng.choice(["batch_size", "max_len"])
        raw.setdefault("data", {})[key] = -rng.randint(1, 50)
        return yaml.safe_dump(raw), f"data.{key}"
    raise ValueError(kind)


KINDS = ["misspelt key", "wrong type", "missing section", "bad yaml", "missing file", "negative size"]


def test_config_fuzzing_every_mutation_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = prepared_configs(tmp_path)
    runner = CliRunner()

    def trial(seed: int) -> None:
        rng = random.Random(seed)
        source = rng.choice(configs)
        kind = KINDS[seed % len(KINDS)]
        text, key_path = mutate(yaml.safe_load(source.read_text()), rng, kind)
        path = tmp_path / f"fuzz{seed}.yaml"
        path.write_text(text)
        message = one_error_line(runner.invoke(app, ["train", str(path), "--no-progress"]))
        assert key_path in message, (source.name, kind, key_path, message)

    run_trials(
        f"config fuzzing over {len(configs)} shipped configs: mutations ending with exit code 2 and one "
        "error line naming the key",
        range(200),
        trial,
    )


def test_heads_not_dividing_width_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for config, heads in (("gpt.yaml", 3), ("transformer_small.yaml", 3)):
        result = CliRunner().invoke(app, ["train", str(ROOT / "configs" / config), f"model.n_heads={heads}"])
        assert "model.n_heads" in one_error_line(result)


def one_letter_edits(key: str) -> set[str]:
    edits = {key[:i] + key[i + 1 :] for i in range(len(key))}
    edits |= {key[:i] + key[i + 1] + key[i] + key[i + 2 :] for i in range(len(key) - 1)}
    return edits | {key[:i] + ("x" if key[i] != "x" else "z") + key[i + 1 :] for i in range(len(key))}


def test_every_one_letter_misspelling_of_every_key_gets_a_did_you_mean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared_configs(tmp_path)
    cases: dict[str, tuple[dict, str, str]] = {}
    for config in ("lstm.yaml", "gpt.yaml", "transformer_small.yaml", "gpt_lora.yaml"):
        raw = yaml.safe_load((ROOT / "configs" / config).read_text())
        for section, keys in known_keys(raw).items():
            if section == "tokenizer" and "init_from" in raw:
                continue  # a fine-tune inherits its tokenizer section; writing one is its own error
            for key in keys:
                if len(key) < 3:
                    continue  # no one-letter edit of "lr" or "r" is closer to it than to a different word
                for wrong in sorted(one_letter_edits(key) - set(keys)):
                    path = f"{section}.{wrong}" if section else wrong
                    cases[f"{config}:{path}"] = (raw, section, wrong)

    def trial(label: str) -> None:
        raw, section, wrong = cases[label]
        mutated = json.loads(json.dumps(raw))
        (mutated.setdefault(section, {}) if section else mutated)[wrong] = 1
        with pytest.raises(ConfigError) as info:
            config_from_dict(mutated)
        path = f"{section}.{wrong}" if section else wrong
        assert f"{path}: unknown key (did you mean" in str(info.value), str(info.value)

    run_trials("one-letter misspellings of every key answered with a 'did you mean'", list(cases), trial)
