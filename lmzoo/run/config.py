"""Reading run configs: YAML files, `section.key=value` overrides, `init_from` inheritance, and
validation into `RunConfig`.

The `model:` and `tokenizer:` sections are validated against the config class registered under
their `name` / `kind`, so importing this module imports the registries (and torch with the models).
A fine-tune (`init_from: RUN`) takes its model and tokenizer sections from that run.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lmzoo.config.errors import describe, describe_kind, did_you_mean
from lmzoo.config.schema import ModelConfig, RunConfig, Section, TokenizerConfig
from lmzoo.data.tokenizer import TOKENIZER_REGISTRY
from lmzoo.errors import ConfigError
from lmzoo.models.registry import MODEL_REGISTRY
from lmzoo.run.layout import CONFIG_FILE

FREE_WHEN_FINE_TUNING = {"dropout"}  # model keys a fine-tune may change; every other key must match
# `init_from: SCHEME:LOCATION` forms a higher package turns into a run directory (scheme -> function of the
# location and the raw config): lmzoo.interop registers "hf", a Hugging Face model folder it imports.
INIT_FROM_SCHEMES: dict[str, Callable[[str, dict], str]] = {}


def parse_config(raw: Any, *, source: str = "config", check_files: bool = True) -> RunConfig:
    """Validate a plain dict (as read from YAML) into a RunConfig; raise ConfigError on any problem.

    `init_from` must already be resolved (`resolve_config` fills in the base run's sections).
    `check_files=False` skips the data files' existence checks (for reloading a trained run).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {describe_kind(raw)}")
    raw = dict(raw)
    model_raw = raw.pop("model", None)
    if model_raw is None:
        raise ConfigError(f"{source}: model: missing section (it needs at least `name:`)")
    tokenizer = validate_tokenizer_section(raw.pop("tokenizer", {}) or {}, "tokenizer", source)
    target_raw = raw.pop("target_tokenizer", None)
    target = (
        None if target_raw is None else validate_tokenizer_section(target_raw, "target_tokenizer", source)
    )
    model = validate_model_section(model_raw, source)
    sections = {"tokenizer": tokenizer, "target_tokenizer": target, "model": model}
    run = _validate(RunConfig, {**raw, **sections}, (), source, {"check_files": check_files})
    try:
        run.check()
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    return run


def validate_model_section(raw: Any, source: str = "model") -> ModelConfig:
    configs = {name: info.config for name, info in MODEL_REGISTRY.items()}
    return _validate_tagged(raw, "model", "name", configs, None, source)  # type: ignore[return-value]


def validate_tokenizer_section(raw: Any, section: str, source: str) -> TokenizerConfig:
    configs = {kind: entry.config for kind, entry in TOKENIZER_REGISTRY.items()}
    return _validate_tagged(raw, section, "kind", configs, "char", source)  # type: ignore[return-value]


def _validate_tagged(
    raw: Any, section: str, tag: str, classes: Mapping[str, type[Section]], default: str | None, source: str
) -> Section:
    """Validate a section whose `tag` key (tokenizer.kind, model.name) picks its config class."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {section}: expected a mapping, got {describe_kind(raw)}")
    choice = raw.get(tag, default)
    if choice is None:
        misspelt = difflib.get_close_matches(tag, [str(k) for k in raw], n=1, cutoff=0.6)
        if misspelt:  # `nme: lstm`: name the key that is there, not only the one that is missing
            raise ConfigError(f"{source}: {section}.{misspelt[0]}: unknown key (did you mean {tag!r}?)")
        raise ConfigError(f"{source}: {section}.{tag}: missing; choose one of {', '.join(sorted(classes))}")
    if choice not in classes:
        hint = did_you_mean(str(choice), classes)
        raise ConfigError(
            f"{source}: {section}.{tag}: unknown {tag} {choice!r}{hint}; known: {', '.join(sorted(classes))}"
        )
    return _validate(classes[choice], {**raw, tag: choice}, (section,), source)


def _validate(
    cls: type[BaseModel], raw: dict, prefix: tuple[str, ...], source: str, context: dict | None = None
) -> Any:
    try:
        return cls.model_validate(raw, context=context)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe(err, cls, prefix)}") from None


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Turn `train.lr=3e-4` style arguments into (key path, YAML-typed value) pairs."""
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        try:
            typed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            typed = value
        parsed.append((key.split("."), typed))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each `a.b.c=value` override in the nested dict `raw` (a new dict is returned)."""
    result = copy.deepcopy(raw)
    for keys, value in parse_overrides(overrides):
        node = result
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {'.'.join(keys)}: {where} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return result


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing file or a syntax error becomes one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None


def read_config_file(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML run config as a plain dict, with `key=value` overrides applied and `name` defaulted."""
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; a config needs at least a `model:` section")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {describe_kind(raw)}")
    if overrides:
        raw = apply_overrides(raw, overrides)
    raw.setdefault("name", Path(path).stem)
    if raw["name"] is None:
        raw["name"] = Path(path).stem
    return raw


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, take an init_from run's sections, validate."""
    return resolve_config(read_config_file(path, overrides), source=str(path))


def resolve_config(raw: Any, *, source: str = "config") -> RunConfig:
    """Validate a raw config; with `init_from`, the model and tokenizer sections come from that run."""
    if isinstance(raw, dict) and raw.get("init_from"):
        raw = {**raw, "init_from": _init_from_run(str(raw["init_from"]), raw, source)}
        raw = _inherit_from_base(raw, Path(raw["init_from"]), source)
    return parse_config(raw, source=source)


def _init_from_run(value: str, raw: dict, source: str) -> str:
    """The run directory `init_from` names: a path, or a registered SCHEME:LOCATION resolved to one."""
    scheme, sep, location = value.partition(":")
    if sep and scheme in INIT_FROM_SCHEMES:
        return INIT_FROM_SCHEMES[scheme](location, raw)
    if sep and scheme == "hf":
        raise ConfigError(f"{source}: init_from: hf: folders are imported by lmzoo.interop; import it first")
    return value


def _inherit_from_base(raw: dict, base_dir: Path, source: str) -> dict:
    """Take model and tokenizer sections from the base run; a section that contradicts it is an error."""
    if not (base_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{source}: init_from: {base_dir} is not a run directory (no {CONFIG_FILE})")
    base = read_yaml(base_dir / CONFIG_FILE)
    if not isinstance(base, dict) or "model" not in base:
        raise ConfigError(f"{source}: init_from: {base_dir}/{CONFIG_FILE} is not an lmzoo run config")
    merged, model = dict(raw), dict(base["model"])
    for key, value in (raw.get("model") or {}).items():
        # an unknown key falls through to validation, which names it with a "did you mean"
        if key in model and key not in FREE_WHEN_FINE_TUNING and model[key] != value:
            raise ConfigError(
                f"{source}: model.{key}: {value!r} differs from the init_from run's {model.get(key)!r}; "
                "a fine-tune keeps the model it starts from (leave the model section out)"
            )
        model[key] = value
    merged["model"] = model
    for section in ("tokenizer", "target_tokenizer"):
        mine, theirs = raw.get(section), base.get(section)
        # Key by key: restating the base run's values (a copied base config) is no conflict.
        if isinstance(mine, dict) and isinstance(theirs, dict):
            differing = [key for key, value in mine.items() if theirs.get(key) != value]
        else:
            differing = [] if mine is None or mine == theirs else [None]
        if differing:
            where = section if differing[0] is None else f"{section}.{differing[0]}"
            raise ConfigError(
                f"{source}: {where}: differs from the init_from run's; a fine-tune reuses that run's "
                "tokenizer as it is (leave the section out)"
            )
        merged[section] = theirs
    return merged
