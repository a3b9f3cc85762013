"""Every YAML under configs/ loads and validates; fine-tunes against base runs laid out as training would."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmzoo.run import load_config
from lmzoo.run.config import config_to_yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory) -> Path:
    """runs/<name>/config.yaml for every config that no other config starts from: what `lmzoo train` writes;
    and for `init_from: hf:DIR`, a tiny GPT-2 folder at DIR (imported when the config loads)."""
    root = tmp_path_factory.mktemp("bases")
    for path in SHIPPED:
        init_from = (yaml.safe_load(path.read_text()) or {}).get("init_from")
        if init_from is None:
            config = load_config(path)
            (root / "runs" / config.name).mkdir(parents=True, exist_ok=True)
            (root / "runs" / config.name / "config.yaml").write_text(config_to_yaml(config))
        elif init_from.startswith("hf:") and not (root / init_from[3:]).exists():
            pytest.importorskip("transformers")
            from hf_models import save_hf_folder

            import lmzoo.interop  # noqa: F401  (init_from: hf:DIR)

            save_hf_folder("gpt2", root / init_from[3:])
    return root


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates(path, base_runs, monkeypatch):
    monkeypatch.chdir(base_runs)  # init_from: runs/<base> resolves here
    config = load_config(path)
    assert config.name == path.stem
    assert config.train.resolved_max_steps(100) > 0
    if config.init_from and not yaml.safe_load(path.read_text())["init_from"].startswith("hf:"):
        base = load_config(CONFIGS / f"{Path(config.init_from).name}.yaml")
        assert config.model.model_dump(exclude={"dropout"}) == base.model.model_dump(exclude={"dropout"})
    elif config.init_from:  # a Hugging Face folder, imported as a run under out_dir
        assert (Path(config.init_from) / "checkpoints" / "best" / "model.safetensors").is_file()


def test_the_shipped_set_covers_every_family():
    from lmzoo.models import list_models

    names = {yaml.safe_load(p.read_text()).get("model", {}).get("name") for p in SHIPPED}
    assert {info.name for info in list_models()} <= names
