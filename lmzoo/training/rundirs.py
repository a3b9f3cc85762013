"""Which run directory a training run writes: a new one, the one it resumes, or one it restarts.

    runs/<name>        the first run of a config
    runs/<name>-2, -3  later runs of the same config (a run never overwrites another)

Nothing is written until training has set itself up, so a config or data problem leaves no directory.
"""

from __future__ import annotations

from pathlib import Path

from lmzoo.config.schema import RunConfig
from lmzoo.errors import ConfigError
from lmzoo.run import Run, checkpoint


class NewRun(Run):
    """A run directory training is about to write; `restart` takes over an existing directory that
    holds no checkpoint (a resumed run that died before its first checkpoint)."""

    def __init__(self, path: Path, config: RunConfig, *, restart: bool = False) -> None:
        super().__init__(path, config)
        self.restarting = restart

    def start(self, *, exist_ok: bool = False) -> None:
        super().start(exist_ok=exist_ok or self.restarting)


def reserve(config: RunConfig, *, restart: bool = False) -> NewRun:
    """The run a new training run will write, at a free path (<name>, <name>-2, ...); nothing is written
    yet. `restart` (--resume of a run that died before its first checkpoint) takes the newest directory
    of this name again when it holds no checkpoint, so a requeued job does not leave empty runs behind."""
    assert config.name is not None
    path, number = Path(config.out_dir) / config.name, 1
    while path.exists():
        number += 1
        path = Path(config.out_dir) / f"{config.name}-{number}"
    previous = path.with_name(config.name if number == 2 else f"{config.name}-{number - 1}")
    if restart and number > 1 and not checkpoint.has_checkpoint(previous):
        return NewRun(previous, config, restart=True)
    return NewRun(path, config)


def create(config: RunConfig) -> Run:
    """A new run directory with its config and base record written."""
    run = reserve(config)
    run.start()
    return run


def for_resume(config: RunConfig) -> Run | None:
    """The newest run of this config's name that has a checkpoint to resume from, or None. The config
    may change anything but the model and the tokenizer."""
    assert config.name is not None
    found = Run.latest(config.out_dir, config.name)
    if found is None:
        return None
    checkpoint.recover_checkpoints(found)
    saved = Run.open(found)
    check_resumable(saved.config, config)
    config.name = saved.config.name
    return Run(found, config)


def check_resumable(saved: RunConfig, config: RunConfig) -> None:
    """A resumed run keeps its model and tokenizer; anything else in the config may change."""
    for section in ("model", "tokenizer"):
        new, old = getattr(config, section).model_dump(), getattr(saved, section).model_dump()
        for key in sorted(set(new) | set(old)):
            if new.get(key) != old.get(key):
                raise ConfigError(
                    f"resume: {section}.{key} is {new.get(key)!r} in the config but {old.get(key)!r} in the "
                    "run; a resumed run must keep its model and tokenizer (start a new run instead)",
                    param="resume",
                )
