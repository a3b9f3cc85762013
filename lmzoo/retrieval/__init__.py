"""Retrieval for self-trained models: kNN-LM datastores and BM25 passage retrieval.

    lmzoo.retrieval.knn        datastore of (hidden state -> next token) with a FAISS index (`lmzoo index`)
    lmzoo.retrieval.interpolate  p = (1 - lambda) p_LM + lambda p_kNN as a model wrapper, `run.with_knn(...)`
    lmzoo.retrieval.knn_eval   held-out loss with a store; lambda and T tuned on half the text (`eval --knn`)
    lmzoo.retrieval.bm25       passages of a folder of .txt/.md files, searched with bm25s (`lmzoo rag index`)
    lmzoo.retrieval.rag        passages before the prompt, and held-out loss with / without them

Importing this package imports neither faiss nor bm25s (nor torch): the modules do, when used. They
come with the `retrieval` extra; without it, using them is one error line that says what to install.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmzoo.errors import CheckpointError

MISSING = "retrieval needs the {} package: pip install 'lmzoo[retrieval]' (faiss-cpu, bm25s)"


def check_version(manifest: dict[str, Any], path: Path, what: str, newest: int, rebuild: str) -> None:
    """Refuse, in one line, a manifest whose format `version` is missing, garbled or newer than `newest`
    (the version this lmzoo writes). `what` names the thing ("kNN datastore"); `rebuild` says how."""
    version = manifest.get("version")
    if "version" not in manifest:
        raise CheckpointError(f"{path}: the {what} manifest has no format version (damaged?): {rebuild}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{path}: {what} format version {json.dumps(version)[:40]} is not a version number "
            f"(damaged?): {rebuild}"
        )
    if version > newest:
        raise CheckpointError(
            f"{path}: {what} format version {version} is newer than this lmzoo reads; upgrade lmzoo"
        )
