"""Errors a user can cause. The CLI prints them as one line and exits with `exit_code`."""

from __future__ import annotations


class LmzooError(Exception):
    """A problem the user can fix (bad config, missing file, mismatched checkpoint...).

    `param` names the library parameter the message is about, written in the message as `param`
    (its value is wrong) or `param=` (pass it); the command line shows its flag there instead.
    """

    exit_code = 2

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ConfigError(LmzooError):
    """The YAML or an override does not describe a valid run."""


class DataError(LmzooError):
    """A corpus file is missing, empty, undecodable or malformed."""


class CheckpointError(LmzooError):
    """A run directory or checkpoint is missing, unsafe, or does not match the model."""


class TrainingStopped(LmzooError):
    """Training ended early on purpose (signal or non-finite loss); the message says how to go on."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
