"""The batched decoding engine: many sequences decode together, each in its own slot.

    from lmzoo.inference.engine import Engine
    engine = Engine(run.load("best", "cpu"), slots=32)
    done = engine.generate(["ROMEO:", "JULIET:"], SamplingOptions(max_new_tokens=50), seeds=[1, 2])
    print(done[0].text, done[0].finish_reason)

For a small model a decoding step is bound by memory traffic and per-call overhead, so a step over 32
sequences costs little more than a step over one: decoding them together multiplies throughput.

Every sequence keeps its own `SequenceDecoder` (sampling options, seeded RNG, stop strings, max tokens,
detokenizer) exactly as one-at-a-time decoding (`lmzoo.inference.decoding.decode`) does; the model side
is one batched state of `slots` rows (`model.decoding_slots`, lmzoo.models.base.DecodingSlots), each
row at its own length. Continuous batching: between two steps finished sequences leave their rows and
queued ones join; the prompts joining in one step are read together (right-padded where the model
allows: lmzoo.inference.prefill), apart from the rows decoding, and each one's state is copied into a
free row. Greedy output therefore equals one-at-a-time output
token for token; sampled output too, given the same seed (up to float rounding of batched matmuls).

A request that is cancelled, or whose `check()` raises (a client gone, a timeout), leaves at the next
step. `background=True` runs the steps in a worker thread that lives while there is work (the server
keeps one engine per loaded run); otherwise `generate` (or `run`) steps in the calling thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import torch

from lmzoo.errors import ConfigError, LmzooError
from lmzoo.inference.decoding import (
    LMStepper,
    Prepared,
    Seq2SeqStepper,
    SequenceDecoder,
    Step,
    choose_next,
    prepare,
)
from lmzoo.inference.loaded import LoadedModel
from lmzoo.inference.prefill import Prefilled, groups, prefill
from lmzoo.inference.sampling import SamplingOptions
from lmzoo.models.base import DecodingSlots, ZooModel


class EngineBusy(LmzooError):
    """The queue of sequences waiting for a slot is full."""


@dataclass
class Request:
    """One sequence to decode: a prompt (text, or token ids) and how to sample it.

    `on_step(step)` is called (in the engine's thread) with each step as it becomes safe to show;
    `check()` is called before every step and may raise to end the sequence (its error is kept).
    """

    prompt: str | Sequence[int]
    options: SamplingOptions
    seed: int | None = None
    top_logprobs: int | None = None
    on_step: Callable[[Step], None] | None = None
    check: Callable[[], None] | None = None


class Generation:
    """One request's progress and result: its steps, `text`, `finish_reason` ("stop", "length", or
    "cancelled"), token counts, the prompt's warnings, and the error that ended it, if one did."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.steps: list[Step] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.warnings: list[str] = []
        self.future: Future[Generation] = Future()  # done when the sequence ends (asyncio: wrap_future)
        self._cancelled = False
        self._ended = False  # the engine has ended it; its future is resolved at the end of the step
        self._ready: Prepared | None = None
        self._next = 0  # the token the next step feeds

    @property
    def _sequence(self) -> SequenceDecoder:
        assert self._ready is not None
        return self._ready.sequence

    @property
    def _stepper(self) -> LMStepper | Seq2SeqStepper:
        assert self._ready is not None
        return self._ready.stepper

    @property
    def text(self) -> str:
        return "".join(step.text for step in self.steps)

    @property
    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> None:
        """Stop at the next step (its slot is freed then); `finish_reason` becomes "cancelled"."""
        self._cancelled = True

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the end; raise the error that ended the sequence, if any."""
        return self.future.result(timeout)


class Engine:
    """Decodes the requests submitted to it in batches of at most `slots` sequences; `max_queue` bounds
    the sequences waiting for a slot (None: no bound)."""

    def __init__(
        self,
        lm: LoadedModel,
        slots: int = 32,
        *,
        max_queue: int | None = None,
        background: bool = False,
    ) -> None:
        if slots < 1:
            raise ConfigError(f"slots must be >= 1, got {slots}", param="slots")
        self.lm, self.capacity, self.max_queue, self.background = lm, slots, max_queue, background
        self.steps = 0  # decoding steps taken (each advances every active sequence by one token)
        self._queue: deque[Generation] = deque()
        self._rows: list[Generation] = []  # the generation in each active row
        self._admitting = 0  # taken from the queue, not yet in a row: they count as active
        self._ending: list[Generation] = []  # ended during this step: resolved once their rows are free
        self._slots: DecodingSlots | None = None
        self._lock = threading.Lock()  # the queue and the worker flag
        self._stepping = threading.Lock()  # one step at a time
        self._worker_alive = False
        self._closed = False

    @property
    def _model(self) -> ZooModel:
        return self.lm.model

    # ---- what callers use ----

    @property
    def active(self) -> int:
        """Sequences decoding now (rows in use, and those being taken into rows)."""
        return len(self._rows) + self._admitting

    @property
    def queued(self) -> int:
        """Sequences waiting for a free row."""
        return len(self._queue)

    def submit(self, request: Request) -> Generation:
        return self.submit_all([request])[0]

    def submit_all(self, requests: Sequence[Request]) -> list[Generation]:
        """Queue requests together (all or none: EngineBusy when the queue cannot take them all)."""
        with self._lock:
            if self._closed:
                raise EngineBusy("the engine is closed")
            waiting = len(self._queue) + max(0, self.active + len(requests) - self.capacity)
            if self.max_queue is not None and waiting > self.max_queue:
                raise EngineBusy(
                    f"{self.active} sequences are decoding and {len(self._queue)} waiting (at most "
                    f"{self.max_queue} may wait); try again shortly"
                )
            made = [Generation(request) for request in requests]
            self._queue.extend(made)
            if self.background and not self._worker_alive:
                self._worker_alive = True
                threading.Thread(target=self._work, name="lmzoo-engine", daemon=True).start()
        return made

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        options: SamplingOptions | Sequence[SamplingOptions],
        *,
        seeds: Sequence[int | None] | None = None,
        top_logprobs: int | None = None,
    ) -> list[Generation]:
        """Decode every prompt (text, or token ids) to its end, in batches of `slots`; one Generation per
        prompt, in order. `options` is one SamplingOptions for all, or one per prompt; `seeds` one per
        prompt (None: unseeded). Raises the first error that ended a sequence."""
        per_prompt = [options] * len(prompts) if isinstance(options, SamplingOptions) else list(options)
        seeds = list(seeds) if seeds is not None else [None] * len(prompts)
        if not len(per_prompt) == len(seeds) == len(prompts):
            raise ConfigError("generate needs one options and one seed per prompt", param="options")
        made = self.submit_all(
            [
                Request(prompt, option, seed=seed, top_logprobs=top_logprobs)
                for prompt, option, seed in zip(prompts, per_prompt, seeds, strict=True)
            ]
        )
        if not self.background:
            self.run()
        return [generation.result() for generation in made]

    def run(self) -> None:
        """Step until nothing is decoding or waiting."""
        while self.step():
            pass

    def close(self) -> None:
        """Refuse new requests; the ones in flight are cancelled at the next step."""
        with self._lock:
            self._closed = True
            for generation in [*self._queue, *self._rows]:
                generation.cancel()

    # ---- one step ----

    @torch.inference_mode()
    def step(self) -> bool:
        """Drop stopped sequences, admit queued ones into free rows, advance every active row by one
        token. Returns whether work remains."""
        with self._stepping:
            try:
                self._drop_stopped()
                self._admit()
                if not self._rows:
                    return bool(self._queue)
                tokens = torch.tensor([g._next for g in self._rows], device=self.lm.device)
                try:
                    assert self._slots is not None
                    logits = self._model.head.logits(self._slots.step(tokens))  # (n, V)
                except Exception as err:  # the model failed: every sequence of the batch ends with it
                    for generation in self._rows:
                        self._finish(generation, error=err)
                    self._rows, self._slots = [], None
                    return bool(self._queue)
                chosen = choose_next([g._sequence for g in self._rows], logits)
                ended = [not self._take(g, token) for g, token in zip(self._rows, chosen, strict=True)]
                finished = [row for row, end in enumerate(ended) if end]
                for row in reversed(finished):
                    self._release(row)
                self.steps += 1
                return True
            finally:
                self._resolve_ended()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue and not self._rows:
                    self._worker_alive = False
                    return
            self.step()

    def _drop_stopped(self) -> None:
        """Cancelled sequences, and those whose check() raises, end now (rows and queue alike)."""
        for row in reversed(range(len(self._rows))):
            if self._stopped(self._rows[row]):
                self._release(row)
        with self._lock:
            kept = [g for g in self._queue if not self._stopped(g)]
            self._queue = deque(kept)

    def _stopped(self, generation: Generation) -> bool:
        if generation._cancelled:
            self._finish(generation, reason="cancelled")
            return True
        if generation.request.check is not None:
            try:
                generation.request.check()
            except BaseException as err:  # noqa: BLE001 (the caller's own reason to stop)
                self._finish(generation, error=err)
                return True
        return False

    def _admit(self) -> None:
        """Read the queued prompts that fit in the free rows, together where the model allows
        (lmzoo.inference.prefill), and take each into a row."""
        with self._lock:
            count = min(self.capacity - len(self._rows), len(self._queue))
            taken = [self._queue.popleft() for _ in range(count)]
            self._admitting = count
        try:
            self._take_into_rows(taken)
        finally:
            with self._lock:
                self._admitting = 0

    def _take_into_rows(self, taken: list[Generation]) -> None:
        ready = []
        for generation in taken:
            try:
                self._prepare(generation)
                ready.append(generation)
            except Exception as err:  # a prompt the model cannot read ends alone
                self._finish(generation, error=err)
                self._admitted(None)
        if not ready:
            return
        if self._slots is None:
            self._slots = self._model.decoding_slots(self.capacity)
        steppers = [g._stepper for g in ready]
        for members in groups(steppers, self._slots.prefill):
            for done in self._read(ready, members):
                chosen = choose_next([ready[i]._sequence for i in done.members], done.logits)
                for position, (i, token) in enumerate(zip(done.members, chosen, strict=True)):
                    kept = self._take(ready[i], token)
                    if kept:
                        self._slots.add(done.state, position, done.lengths[position])
                    self._admitted(ready[i] if kept else None)

    def _admitted(self, generation: Generation | None) -> None:
        """One sequence taken from the queue is in its row now (or ended before it got one)."""
        with self._lock:
            if generation is not None:
                self._rows.append(generation)
            self._admitting -= 1

    def _read(self, ready: list[Generation], members: list[int]) -> list[Prefilled]:
        """One pass over the members' prompts; if it fails, each alone (a prompt that fails ends)."""
        try:
            return [prefill([g._stepper for g in ready], members)]
        except Exception as err:
            if len(members) == 1:
                self._finish(ready[members[0]], error=err)
                return []
        return [done for member in members for done in self._read(ready, [member])]

    def _prepare(self, generation: Generation) -> Prepared:
        request = generation.request
        ready = prepare(
            self.lm,
            request.prompt,
            request.options,
            seed=request.seed,
            top_logprobs=request.top_logprobs,
            warn=generation.warnings.append,
        )
        generation._ready, generation.prompt_tokens = ready, ready.prompt_tokens
        return ready

    def _take(self, generation: Generation, token: int) -> bool:
        """Take this step's token; False once the sequence has ended."""
        sequence = generation._sequence
        steps = sequence.accept(token)
        generation.steps += steps
        generation._next = token
        if generation.request.on_step is not None:
            try:
                for step in steps:
                    generation.request.on_step(step)
            except BaseException as err:  # noqa: BLE001 (nobody listens any more: the sequence ends)
                self._finish(generation, error=err)
                return False
        if sequence.done:
            self._finish(generation, reason=sequence.finish_reason)
            return False
        return True

    def _release(self, row: int) -> None:
        """Free `row` (the last active row moves into it)."""
        assert self._slots is not None
        moved = self._slots.free(row)
        last = self._rows.pop()
        if moved is not None:
            self._rows[row] = last

    def _finish(
        self, generation: Generation, *, reason: str | None = None, error: BaseException | None = None
    ) -> None:
        if generation._ended or generation.future.done():  # done: its caller cancelled the future
            return
        generation._ended = True
        if generation._ready is not None:
            generation.completion_tokens = generation._ready.sequence.produced
        generation.finish_reason, generation.error = reason, error
        self._ending.append(generation)

    def _resolve_ended(self) -> None:
        """Resolve the futures of the sequences that ended this step, after their rows are freed: a
        client that gets its answer and sends the next request at once finds the slot free."""
        ended, self._ending = self._ending, []
        for generation in ended:
            try:
                if generation.error is not None:
                    generation.future.set_exception(generation.error)
                else:
                    generation.future.set_result(generation)
            except InvalidStateError:  # its caller cancelled the future meanwhile: nobody waits
                pass
