"""Every YAML under configs/ loads and validates; fine-tunes against base runs laid out as training would."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmzoo.run import load_config
from lmzoo.run.config import config_to_yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))
BY_NAME = {(yaml.safe_load(p.read_text()) or {}).get("name", p.stem): p for p in SHIPPED}


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory) -> Path:
    """runs/<name>/config.yaml for every config that no other config starts from: what `lmzoo train` writes;
    and for `init_from: hf:DIR`, a tiny GPT-2 folder at DIR (imported when the config loads)."""
    root = tmp_path_factory.mktemp("bases")
    from lmzoo.stages.suite import SuiteSizes, write_suite

    write_suite(root / "data" / "suite", 0, SuiteSizes(8, 2, 2, 4, 2, 2))  # what stages/*.yaml read
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # data paths resolve here, as for a user who ran `lmzoo suite`
        _lay_out_base_runs(root)
    return root


def _lay_out_base_runs(root: Path) -> None:
    """Every config's run, bases before the runs that start from them (the stages recipe is a chain)."""
    pending = list(SHIPPED)
    while pending:
        waiting = []
        for path in pending:
            init_from = (yaml.safe_load(path.read_text()) or {}).get("init_from")
            if init_from is not None and init_from.startswith("hf:"):
                if not (root / init_from[3:]).exists():
                    pytest.importorskip("transformers")
                    from hf_models import save_hf_folder

                    import lmzoo.interop  # noqa: F401  (init_from: hf:DIR)

                    save_hf_folder("gpt2", root / init_from[3:])
                continue
            if init_from is not None and not (root / init_from / "config.yaml").is_file():
                waiting.append(path)  # its base is laid out in a later round
                continue
            config = load_config(path)
            (root / "runs" / config.name).mkdir(parents=True, exist_ok=True)
            (root / "runs" / config.name / "config.yaml").write_text(config_to_yaml(config))
        assert len(waiting) < len(pending), f"configs whose init_from no config trains: {waiting}"
        pending = waiting


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates(path, base_runs, monkeypatch):
    monkeypatch.chdir(base_runs)  # init_from: runs/<base> resolves here
    config = load_config(path)
    assert config.name == path.stem or config.name == f"{path.parent.name}_{path.stem}"
    assert config.train.resolved_max_steps(100) > 0
    if config.init_from and not yaml.safe_load(path.read_text())["init_from"].startswith("hf:"):
        base = load_config(BY_NAME[Path(config.init_from).name])
        assert config.model.model_dump(exclude={"dropout"}) == base.model.model_dump(exclude={"dropout"})
    elif config.init_from:  # a Hugging Face folder, imported as a run under out_dir
        assert (Path(config.init_from) / "checkpoints" / "best" / "model.safetensors").is_file()


def test_the_shipped_set_covers_every_family():
    from lmzoo.models import list_models

    names = {yaml.safe_load(p.read_text()).get("model", {}).get("name") for p in SHIPPED}
    assert {info.name for info in list_models()} <= names
