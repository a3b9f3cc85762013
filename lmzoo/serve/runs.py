"""The runs a server may load: safe name lookup under --runs, a small LRU of loaded runs, each with its
decoding engine and a lock.

A request names a run only by its directory name under the runs folder. A name that is a path, holds
`..` or starts with a dot is refused; so is a run whose directory, or any symlink inside it, or the
base run of a fine-tune, resolves outside the runs folder. Weights are safetensors and the config is
YAML, so nothing a request reaches is unpickled or executed.

Generation goes to the run's `Engine` (lmzoo.inference.engine), which decodes up to `limits.slots`
sequences together in its own worker thread, each in its own state slot, with at most
`limits.max_queue` waiting. Other work on a run (loading it, scoring, next tokens, beam search) happens
in a worker thread that holds the run's lock, and the event loop stays free. Every step checks a
`Budget`: the client went away, the timeout passed, or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lmzoo.errors import CheckpointError, LmzooError
from lmzoo.serve.errors import APIError, Cancelled, bad_request, not_found, shutting_down, timed_out
from lmzoo.serve.limits import Limits

if TYPE_CHECKING:
    from lmzoo.inference.engine import Engine
    from lmzoo.run import Run

T = TypeVar("T")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


class Shutdown:
    """Set when the server is asked to stop: in-flight work gets a grace period, then is cut."""

    def __init__(self) -> None:
        self.stop_at: float | None = None

    def begin(self, grace_s: float) -> None:
        if self.stop_at is None:
            self.stop_at = time.monotonic() + grace_s

    def due(self) -> bool:
        return self.stop_at is not None and time.monotonic() >= self.stop_at


class Budget:
    """One request's allowance: its deadline, whether its client is gone, whether the server stops."""

    def __init__(self, seconds: float, shutdown: Shutdown) -> None:
        self.seconds, self.deadline = seconds, time.monotonic() + seconds
        self.cancelled = threading.Event()
        self._shutdown = shutdown

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def cancel(self) -> None:
        self.cancelled.set()

    def check(self) -> None:
        """Raise if the work should stop now (called between decoding steps)."""
        if self.cancelled.is_set():
            raise Cancelled()
        if self._shutdown.due():
            raise shutting_down()
        if self.remaining() <= 0:
            raise timed_out(self.seconds)


class FairLock:
    """A lock taken in arrival order. (threading.Lock promises no order; under load it lets new requests
    overtake waiting ones, and the unlucky ones wait many times the mean.) `check` runs while waiting,
    so a request that times out or is abandoned leaves the queue."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._waiting: deque[object] = deque()
        self._held = False

    def acquire(self, check: Callable[[], None]) -> None:
        ticket = object()
        with self._condition:
            self._waiting.append(ticket)
            try:
                while self._held or self._waiting[0] is not ticket:
                    self._condition.wait(timeout=0.1)
                    check()
            except BaseException:
                self._waiting.remove(ticket)
                self._condition.notify_all()
                raise
            self._waiting.popleft()
            self._held = True

    def release(self) -> None:
        with self._condition:
            self._held = False
            self._condition.notify_all()


@dataclass
class Entry:
    """A run directory at one checkpoint time: its lock, the Run once opened (models cache inside), and
    the engine that decodes its requests once one asked for generation."""

    path: Path
    stamp: float
    lock: FairLock = field(default_factory=FairLock)
    run: Any = None
    engine: Engine | None = None
    opened: Any = None  # the Run opened for metadata (tokenizers) before any model is loaded


class RunRegistry:
    """Finds runs under `root`, keeps the `cache_size` most recently used loaded, and runs work on them."""

    def __init__(
        self, root: str | Path, *, limits: Limits, cache_size: int = 2, device: str = "auto"
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise CheckpointError(f"--runs {root}: no such directory")
        self.limits, self.cache_size, self.device = limits, max(1, cache_size), device
        self.shutdown = Shutdown()
        self._cache: OrderedDict[str, Entry] = OrderedDict()
        self._checked: dict[str, tuple[Entry, int | None]] = {}  # run name -> its running entry, marker
        self._guard = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="lmzoo-serve")

    # ---- finding runs ----

    def names(self) -> list[str]:
        """The runs a request may name: directories under the root that pass `locate` and have a checkpoint."""
        found = []
        for child in sorted(self.root.iterdir()):
            try:
                self.locate(child.name)
            except APIError:
                continue
            found.append(child.name)
        return found

    def locate(self, name: object) -> Path:
        """The resolved directory of run `name`, or a 400 (not a plain name) / 404 (no such run here)."""
        from lmzoo.run import Run

        if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
            raise bad_request(
                f"model {str(name)[:100]!r} is not a run name: name a run under the runs folder, "
                "not a path (GET /v1/models lists them)",
                param="model",
                code="invalid_model_name",
            )
        unknown = not_found(f"the model {name!r} does not exist here (GET /v1/models lists the runs)")
        try:
            real = (self.root / name).resolve(strict=True)
        except (OSError, RuntimeError):
            raise unknown from None
        if real.parent != self.root or not real.is_dir() or self._escapes(real):
            raise unknown
        if not Run.trained_at(real):
            raise not_found(f"the run {name!r} has no checkpoint yet")
        return real

    def _escapes(self, directory: Path) -> bool:
        """Whether any symlink inside `directory` leads outside the runs folder."""
        for top, dirs, files in os.walk(directory, followlinks=False):
            for entry in dirs + files:
                path = Path(top) / entry
                if path.is_symlink() and not path.resolve().is_relative_to(self.root):
                    return True
        return False

    def _entry(self, name: str) -> Entry:
        from lmzoo.run import Run

        path = self.locate(name)
        try:
            stamp = Run.checkpoint_time_at(path)
        except OSError:
            raise not_found(f"the run {name!r} was removed") from None
        with self._guard:
            entry = self._cache.get(str(path))
            if entry is None or entry.stamp != stamp:  # new, or retrained since: load afresh
                entry = self._cache[str(path)] = Entry(path, stamp)
            self._cache.move_to_end(str(path))
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # a request still using it keeps its own reference
            return entry

    def open(self, name: str) -> Run:
        """The `Run` for `name` (configs and metadata only; no lock needed, no model loaded)."""
        from lmzoo.run import Run

        path = self.locate(name)
        try:
            return Run.open(path)
        except (LmzooError, OSError) as err:
            raise self._unusable(name, path, err) from None

    def opened(self, name: str) -> Run:
        """The cached `Run` for `name` (its tokenizers read once), for requests that need no model."""
        entry = self._entry(name)
        if entry.run is None and entry.opened is None:
            entry.opened = self.open(name)
        return entry.run or entry.opened

    # ---- running work ----

    def budget(self) -> Budget:
        return Budget(self.limits.timeout_s, self.shutdown)

    async def call(self, name: str, work: Callable[[Any, Budget], T], budget: Budget) -> T:
        """`work(run, budget)` in a worker thread holding run `name`'s lock; its errors as APIError."""
        return await self._call_on(name, self._entry(name), work, budget)

    async def engine(self, name: str, budget: Budget) -> tuple[Run, Engine]:
        """Run `name` and the engine decoding its requests (the model loaded on first use)."""
        entry = self._running(name) or self._entry(name)
        if entry.engine is None:

            def start(run: Run, budget: Budget) -> None:
                from lmzoo.inference.engine import Engine

                if entry.engine is None:
                    lm = run.load("best", self.device)
                    limits = self.limits
                    entry.engine = Engine(lm, limits.slots, max_queue=limits.max_queue, background=True)

            await self._call_on(name, entry, start, budget)
        assert entry.engine is not None
        with self._guard:
            self._checked[name] = (entry, self._checkpoints_marker(entry.path))
        return entry.run, entry.engine

    def _running(self, name: str) -> Entry | None:
        """The cached entry of run `name` with a running engine, if its checkpoints folder is unchanged
        since the run was last found by `locate` (one stat instead of its checks: generation on a
        loaded model reads nothing from disk). A run deleted or retrained since goes the long way."""
        with self._guard:
            known = self._checked.get(name)
            if known is None or known[0].engine is None:
                return None
            entry, marker = known
            if (
                self._cache.get(str(entry.path)) is not entry
                or self._checkpoints_marker(entry.path) != marker
            ):
                del self._checked[name]
                return None
            self._cache.move_to_end(str(entry.path))
            return entry

    @staticmethod
    def _checkpoints_marker(path: Path) -> int | None:
        try:
            return (path / "checkpoints").stat().st_mtime_ns  # a checkpoint saved renames inside it
        except OSError:
            return None

    def engines(self) -> dict[str, Engine]:
        """The engines of the runs loaded now, by run name."""
        with self._guard:
            return {e.path.name: e.engine for e in self._cache.values() if e.engine is not None}

    async def _call_on(self, name: str, entry: Entry, work: Callable[[Any, Budget], T], budget: Budget) -> T:
        future = self._executor.submit(self._locked, name, entry, work, budget)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            budget.cancel()  # the worker stops at its next step and releases the lock
            raise

    def _locked(self, name: str, entry: Entry, work: Callable[[Any, Budget], T], budget: Budget) -> T:
        entry.lock.acquire(budget.check)
        try:
            budget.check()
            if entry.run is None:
                entry.run = self._load(name, entry.path)
            return work(entry.run, budget)
        except (APIError, Cancelled):
            raise
        except LmzooError as err:
            raise self._unusable(name, entry.path, err) from None
        except OSError as err:
            raise self._unusable(name, entry.path, err) from None
        except Exception:
            traceback.print_exc(file=sys.stderr)
            raise APIError(500, f"internal error while serving {name!r} (logged by the server)") from None
        finally:
            entry.lock.release()

    def _load(self, name: str, path: Path) -> Any:
        from lmzoo.run import Run

        try:
            run = Run.open(path)
            if not self._bases_inside(run):
                raise not_found(
                    f"the run {name!r} is a fine-tune of a run outside the runs folder; not served"
                )
            run.base_dir  # noqa: B018  (a fine-tune's base must be there, and be the one it was tuned from)
        except (LmzooError, OSError) as err:
            raise self._unusable(name, path, CheckpointError(str(err))) from None
        return run

    def _bases_inside(self, run: Run) -> bool:
        """Whether every place the run looks for a fine-tune's base run (--base, base.json's relative path,
        the config's init_from) is under the runs folder, checked before anything there is read."""
        return all(
            c.resolve().is_relative_to(self.root) and not self._escapes(c.resolve())
            for c in run.base_candidates()
            if c.exists()
        )

    def _unusable(self, name: str, path: Path, err: Exception) -> APIError:
        if not path.exists():
            return not_found(f"the run {name!r} was removed")
        if isinstance(err, LmzooError) and not isinstance(err, CheckpointError):
            return bad_request(str(err))
        return APIError(500, f"the run {name!r} cannot be loaded: {err}", code="run_unusable")

    def close(self) -> None:
        for engine in self.engines().values():
            engine.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
