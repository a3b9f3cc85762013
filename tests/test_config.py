"""The run schema: one-line errors that name the key path, overrides, and a lossless YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import base_config_dict, config_from_dict, deep_merge, tiny_model_section

from lmzoo.config.schema import resolve_data_path
from lmzoo.errors import ConfigError, LmzooError
from lmzoo.models import get_model_info, list_models
from lmzoo.run import load_config
from lmzoo.run.config import apply_overrides, config_to_yaml, parse_overrides


def config_error(raw: dict, source: str = "config") -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, source=source)
    message = str(info.value)
    assert "\n" not in message, f"error must be one line: {message!r}"
    assert isinstance(info.value, LmzooError) and info.value.exit_code == 2
    return message


@pytest.fixture
def raw(tmp_path, corpus_file) -> dict:
    return base_config_dict(tmp_path / "runs", corpus_file)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ---- unknown keys ------------------------------------------------------------------------------


def test_unknown_model_key_names_path_and_suggests(raw):
    raw["model"]["hidden_sise"] = 16
    message = config_error(raw)
    assert "model.hidden_sise" in message
    assert "did you mean 'hidden_size'" in message


def test_unknown_key_from_yaml_file_names_the_file(tmp_path, raw):
    raw["model"]["hidden_sise"] = 16
    path = write_yaml(tmp_path / "run.yaml", raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert "model.hidden_sise: unknown key (did you mean 'hidden_size'?)" in message


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        ("train", "lrr", "lr"),
        ("train", "max_step", "max_steps"),
        ("data", "batch_sise", "batch_size"),
        ("sample", "temprature", "temperature"),
        ("tokenizer", "fit_onn", "fit_on"),
        (None, "trian", "train"),
        (None, "seeed", "seed"),
    ],
)
def test_unknown_keys_in_every_section(raw, section, key, suggestion):
    if section is None:
        raw[key] = 1
        path = key
    else:
        raw.setdefault(section, {})[key] = 1
        path = f"{section}.{key}"
    message = config_error(raw)
    assert f"{path}: unknown key" in message
    assert f"did you mean '{suggestion}'" in message


def test_unknown_key_without_close_match_lists_known_keys(raw):
    raw["train"]["zzzzzz"] = 1
    message = config_error(raw)
    assert "train.zzzzzz: unknown key" in message
    assert "known keys:" in message and "max_steps" in message


def test_unknown_word_tokenizer_key_uses_that_kinds_fields(raw):
    raw["tokenizer"] = {"kind": "word", "lowercse": False}
    message = config_error(raw)
    assert "tokenizer.lowercse" in message and "did you mean 'lowercase'" in message


@pytest.mark.parametrize(
    ("section", "tag", "bad", "good"),
    [("model", "name", "lstn", "lstm"), ("tokenizer", "kind", "wrd", "word")],
)
def test_unknown_family_suggests_and_lists(raw, section, tag, bad, good):
    raw[section][tag] = bad
    message = config_error(raw)
    assert f"{section}.{tag}" in message and repr(bad) in message
    assert f"did you mean '{good}'" in message


# ---- wrong types and values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "expected_type"),
    [
        ("model.hidden_size", "big", "integer"),
        ("model.dropout", "lots", "number"),
        ("train.lr", "fast", "number"),
        ("train.max_steps", "many", "integer"),
        ("data.batch_size", 2.5, "integer"),
        ("tokenizer.fit_on", 3, "'train' or 'all'"),
        ("train.device", "tpu", "cpu"),
        ("data.train", 5, "string"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(raw, path, value, expected_type):
    section, key = path.split(".")
    raw[section][key] = value
    message = config_error(raw)
    assert f"{path}:" in message, message
    assert repr(value) in message, message
    assert expected_type in message, message


def test_out_of_range_value(raw):
    raw["model"]["hidden_size"] = 0
    message = config_error(raw)
    assert "model.hidden_size" in message and "greater than 0" in message and "got 0" in message


def test_split_must_sum_to_one(raw):
    raw["data"]["split"] = [0.5, 0.2, 0.2]
    message = config_error(raw)
    assert "data.split" in message and "add up to 0.9" in message


def test_missing_data_file_names_data_train(raw, tmp_path):
    missing = tmp_path / "nope.txt"
    raw["data"]["train"] = str(missing)
    message = config_error(raw)
    assert "data.train" in message
    assert str(missing) in message and "not found" in message


def test_missing_val_file_names_data_val(raw, tmp_path):
    raw["data"]["val"] = str(tmp_path / "val_missing.txt")
    assert "data.val" in config_error(raw)


def test_missing_model_section(raw):
    del raw["model"]
    assert "model" in config_error(raw)


def test_top_level_must_be_mapping():
    assert "mapping" in config_error([1, 2, 3])


# ---- YAML files ----------------------------------------------------------------------------------


def test_bad_yaml_is_one_line_with_line_number(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: lstm\n  hidden_size: [16\ntrain:\n  lr: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "invalid YAML" in message
    assert "line 4" in message  # where PyYAML notices the unclosed bracket


def test_yaml_tab_indentation_reports_its_line(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("data:\n  batch_size: 4\nmodel:\n\tname: lstm\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 4" in str(info.value) and "\n" not in str(info.value)


def test_missing_and_empty_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)


def test_load_config_fills_name_from_file_stem(tmp_path, raw):
    del raw["name"]
    config = load_config(write_yaml(tmp_path / "my-run.yaml", raw))
    assert config.name == "my-run"


# ---- overrides -------------------------------------------------------------------------------------


def test_overrides_are_applied_with_the_right_types(tmp_path, raw):
    path = write_yaml(tmp_path / "run.yaml", raw)
    config = load_config(
        path, ["train.lr=3e-4", "model.hidden_size=16", "model.dropout=0.25", "data.sampling=random"]
    )
    assert config.train.lr == pytest.approx(3e-4) and type(config.train.lr) is float
    assert config.model.hidden_size == 16 and type(config.model.hidden_size) is int
    assert config.model.dropout == 0.25
    assert config.data.sampling == "random"
    # Everything not overridden is as in the file.
    assert config.train.max_steps == raw["train"]["max_steps"]
    assert config.model.embedding_dim == raw["model"]["embedding_dim"]


def test_parse_overrides_types_values_like_yaml():
    parsed = dict(
        (".".join(k), v)
        for k, v in parse_overrides(
            [
                "model.hidden_size=16",
                "train.lr=0.5",
                "model.tie_weights=true",
                "train.patience=null",
                "sample.prompt=",
                "sample.prompt2='ROMEO:'",
                "model.head_sizes=[8, 4]",
            ]
        )
    )
    assert parsed["model.hidden_size"] == 16 and type(parsed["model.hidden_size"]) is int
    assert parsed["train.lr"] == 0.5 and type(parsed["train.lr"]) is float
    assert parsed["model.tie_weights"] is True
    assert parsed["train.patience"] is None
    assert parsed["sample.prompt"] == ""
    assert parsed["sample.prompt2"] == "ROMEO:"
    assert parsed["model.head_sizes"] == [8, 4]


def test_apply_overrides_creates_sections_and_leaves_input_untouched():
    raw = {"model": {"name": "lstm"}}
    out = apply_overrides(raw, ["train.lr=0.1", "model.hidden_size=16"])
    assert out == {"model": {"name": "lstm", "hidden_size": 16}, "train": {"lr": 0.1}}
    assert raw == {"model": {"name": "lstm"}}


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", ".lr=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides([bad])


def test_override_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="train.lr is a value, not a section"):
        apply_overrides({"train": {"lr": 1.0}}, ["train.lr.x=3"])


def test_override_with_unknown_key_gets_a_suggestion(tmp_path, raw):
    path = write_yaml(tmp_path / "run.yaml", raw)
    with pytest.raises(
        ConfigError, match=r"model\.hidden_sise: unknown key \(did you mean 'hidden_size'\?\)"
    ):
        load_config(path, ["model.hidden_sise=16"])


# ---- round trip ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", [info.name for info in list_models()])
@pytest.mark.parametrize(
    "tokenizer",
    [
        {"kind": "char"},
        {"kind": "word", "min_freq": 2, "max_vocab": 50, "filters": ""},
        {"kind": "bpe", "vocab_size": 300},
    ],
)
def test_resolved_config_round_trips_through_yaml(raw, model_name, tokenizer):
    raw = deep_merge(
        raw, {"tokenizer": tokenizer, "data": {"split": [0.8, 0.1, 0.1]}, "train": {"betas": [0.8, 0.95]}}
    )
    raw["model"] = tiny_model_section(model_name)
    if get_model_info(model_name).kind == "seq2seq":
        raw["data"]["format"] = "tsv"
        raw["data"]["max_len"] = 32
    config = config_from_dict(raw)
    text = config_to_yaml(config)
    again = config_from_dict(yaml.safe_load(text))
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert config_to_yaml(again) == text
    # The dump is the resolved config: defaults are spelled out, and the family's own class is kept.
    dumped = yaml.safe_load(text)
    assert dumped["train"]["optimizer"] == "adamw"
    assert dumped["model"]["name"] == model_name
    assert type(again.model) is type(config.model)
    assert type(again.tokenizer) is type(config.tokenizer)


def test_bundled_corpus_path_resolves():
    path = resolve_data_path("lmzoo:tinyshakespeare.txt")
    assert path.is_file() and path.name == "tinyshakespeare.txt"
    assert resolve_data_path("some/file.txt") == Path("some/file.txt")
