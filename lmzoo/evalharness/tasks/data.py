"""The documents of the lmzoo_shakespeare tasks: JSON lines beside this file, read without any network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def load(file: str, **_: Any) -> dict[str, Any]:
    """{"test": the documents of `file`} as a datasets.Dataset (lm-eval's `custom_dataset`)."""
    import datasets

    with open(HERE / file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
