"""A run's metrics.jsonl read back: the records, and the history with resumed segments stitched.

lmzoo.training.tracking writes the file (one JSON object per logged step, a start/resume record per
training segment); `Run.metrics()` and `Run.history()` read it through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (skipping a torn last line); [] when there is none."""
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


@dataclass
class Segment:
    """One stretch of training between a start/resume and the last record before the next resume."""

    event: str  # "start" or "resume"
    first_step: int
    last_step: int
    seconds: float


@dataclass
class History:
    """A run's metrics.jsonl read as one continuous history: resumed segments stitched in step order.

    `elapsed` is training wall time (seconds since the run started, summed over segments, so the gap
    between an interruption and its resume is not counted) for every record that has a `time`.
    """

    records: list[dict[str, Any]]  # scalar records, in file order (every step at most once per tag)
    markers: list[dict[str, Any]]  # the start/resume records with the facts of each segment
    elapsed: list[float | None]  # aligned with `records`
    segments: list[Segment]

    def series(self, tag: str) -> tuple[list[int], list[float], list[float | None]]:
        """(steps, values, elapsed seconds) of one tag ("inf"/"nan" strings become floats)."""
        rows = [
            (r["step"], float(r[tag]), t) for r, t in zip(self.records, self.elapsed, strict=True) if tag in r
        ]
        return [s for s, _, _ in rows], [v for _, v, _ in rows], [t for _, _, t in rows]

    def tags(self) -> list[str]:
        return sorted({k for r in self.records for k in r if k not in ("step", "time")})

    @property
    def resume_steps(self) -> list[int]:
        return [m["step"] for m in self.markers if m.get("event") == "resume"]

    @property
    def facts(self) -> dict[str, Any]:
        """The latest segment's facts (parameters, device, versions); empty for runs that predate them."""
        merged: dict[str, Any] = {}
        for marker in self.markers:
            merged.update({k: v for k, v in marker.items() if k not in ("step", "event", "time")})
        return merged

    @property
    def wall_seconds(self) -> float | None:
        return sum(s.seconds for s in self.segments) if self.segments else None


def read_history(path: Path) -> History:
    """metrics.jsonl as a History (a resumed run's file was cut at the resume step, so steps are unique).

    A segment that logged nothing before another began at the same step (a start that failed before
    its first step and was restarted) is superseded by it."""
    records: list[dict[str, Any]] = []
    markers: list[dict[str, Any]] = []
    elapsed: list[float | None] = []
    segments: list[Segment] = []
    done, start, empty = (
        0.0,
        None,
        False,
    )  # seconds of finished segments; when this one started; no records yet
    for record in read_metrics(path):
        if "event" in record:
            if empty and segments[-1].first_step == record["step"]:
                segments.pop(), markers.pop()
            elif segments and start is not None:
                done += segments[-1].seconds
            start, empty = record.get("time"), True
            markers.append(record)
            segments.append(Segment(record["event"], record["step"], record["step"], 0.0))
            continue
        now = record.get("time")
        seconds = None if start is None or now is None else now - start
        elapsed.append(None if seconds is None else done + seconds)
        records.append(record)
        empty = False
        if segments:
            segments[-1].last_step = max(segments[-1].last_step, record["step"])
            segments[-1].seconds = max(segments[-1].seconds, seconds or 0.0)
    return History(records, markers, elapsed, segments)
