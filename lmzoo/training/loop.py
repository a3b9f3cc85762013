"""The training loop: config -> setup -> one explicit loop -> checkpoints.

Everything a resumed run needs to continue exactly where an uninterrupted run would be is saved
in `checkpoints/last/state.pt`: optimiser, grad scaler, every RNG, the data position, a carried
recurrent state, the step, the best validation loss and the early-stopping counter.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmzoo.config.schema import RunConfig
from lmzoo.data.streams import RandomWindows
from lmzoo.device import (
    rng_state,
    set_rng_state,
)
from lmzoo.errors import ConfigError, TrainingStopped
from lmzoo.models.peft import parameter_counts
from lmzoo.training.distributed import (
    DistContext,
    any_rank,
    barrier,
    from_main,
    full_state_dict,
    gather_to_main,
    init_distributed,
    load_full_state,
    shutdown,
    unsharded,
)
from lmzoo.training.optim import NonFiniteWatch, StepResult, lr_at
from lmzoo.training.rundirs import NewRun
from lmzoo.training.setup import open_run, setup_training
from lmzoo.training.tracking import LogWindow, ProgressBar, Tracker, describe_metrics, environment

EXIT_NONFINITE = 3
EXIT_PEER_FAILED = 4
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_SIGNAL:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        self.signal = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this step "
            "(Ctrl-C again to quit without saving)",
            file=sys.stderr,
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LoopState:
    """The counters a resumed run restores."""

    step: int = 0
    tokens_seen: int = 0
    best_score: float | None = None  # the best validation value of the metric that picks `best`
    evals_since_best: int = 0


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    resume_hint: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Train the run the config describes (or continue it with resume=True); return its directory.

    Under torchrun this runs on every rank (DDP, or FSDP with train.strategy: fsdp); rank 0 alone
    writes the run directory.
    """
    dist = init_distributed(config.train.device)
    try:
        return Trainer(config, dist, resume=resume, progress=progress, resume_hint=resume_hint).run(on_step)
    except (RuntimeError, OSError) as err:
        if dist.enabled and _is_peer_failure(err):
            reason = str(err).splitlines()[0][:160]
            raise TrainingStopped(
                f"rank {dist.rank}: another process of this distributed run stopped ({reason}); exiting",
                EXIT_PEER_FAILED,
            ) from None
        raise
    finally:
        shutdown(dist)


def _is_peer_failure(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return any(
        word in text for word in ("connection", "gloo", "nccl", "timed out", "timeout", "broken pipe", "peer")
    )


class Trainer:
    """One training run: setup from the config (or the run being resumed), then the loop."""

    def __init__(
        self, config: RunConfig, dist: DistContext, *, resume: bool, progress: bool, resume_hint: str | None
    ) -> None:
        self.config, self.dist, self.tcfg = config, dist, config.train
        self.bar = ProgressBar(0, 0, enabled=False, quiet=not dist.is_main)
        self.run_, self.resuming = open_run(config, resume, dist, say=self.bar.write)
        self.run_dir = self.run_.path
        saved = self.run_.tokenizers() if self.resuming else None
        show = progress and dist.is_main
        self.setup = setup_training(config, saved, dist, self.run_, progress=show, say=self.bar.write)
        self.task, self.stepper, self.model = self.setup.task, self.setup.stepper, self.setup.task.model
        self.loop = LoopState()
        self.watch = NonFiniteWatch(self.setup.device)  # non-finite steps, read at log/eval/save steps
        self.last_save = _now()  # train.checkpoint_every_minutes counts from here and from each save
        if self.resuming:
            self._restore()
        if dist.is_main:
            if not self.resuming:
                self.run_.start()  # only now: a setup problem leaves no directory behind
                self.run_.save_tokenizers(self.task.tokenizer, self.task.target_tokenizer)
            self.run_.write_config()  # the resolved config: every default, and seq_len filled in
        restarting = isinstance(self.run_, NewRun) and self.run_.restarting
        resume_step = self.loop.step if self.resuming or restarting else None
        self.tracker = (
            Tracker(self.run_.path, self.run_.metrics_path, resume_step=resume_step) if dist.is_main else None
        )
        self.bar = ProgressBar(
            self.setup.max_steps, self.loop.step, enabled=progress and dist.is_main, quiet=not dist.is_main
        )
        self.hint = resume_hint or f"lmzoo train <config> --resume  (run {self.run_dir})"
        self._announce()

    def _announce(self) -> None:
        trainable, total = parameter_counts(self.model)
        share = f", {trainable:,} trainable ({trainable / total:.2%})" if trainable != total else ""
        world, batch, accum = self.dist.world_size, self.config.data.batch_size, self.tcfg.grad_accum
        scale = (
            (
                f", {world} processes x batch {batch} x accumulation {accum} = global batch "
                f"{world * batch * accum}"
            )
            if self.dist.enabled
            else ""
        )
        self.bar.write(
            f"lmzoo: {'resuming' if self.resuming else 'training'} {self.config.model.name} ({total:,} parameters"
            f"{share}, vocab {self.task.tokenizer.vocab_size}) on {self.setup.device.type}, {self.setup.precision}, "
            f"{self.setup.max_steps} steps{scale} -> {self.run_dir}"
        )
        if self.tracker is not None:  # once per segment, as text: no one-point charts in TensorBoard
            facts = {
                "params/trainable": trainable,
                "params/total": total,
                "global_batch": world * batch * accum,
            }
            facts.update(environment(self.setup.device, self.setup.precision))
            self.tracker.begin(
                self.loop.step, resumed=self.resuming, config=self.config.to_dict(), facts=facts
            )

    # ---- checkpoints ----------------------------------------------------------------------------

    def _rank_state(self) -> dict[str, Any]:
        return {"rng": rng_state(), **self.task.objective.state_dict()}

    def _checkpoint_model(self) -> torch.nn.Module | None:
        """The module rank 0 writes. FSDP: every rank sends its shards (a collective) and rank 0 alone
        builds a full CPU copy for the duration of the save."""
        if not self.setup.sharded:
            return self.model if self.dist.is_main else None
        state = full_state_dict(self.model, self.dist)
        if not self.dist.is_main:
            return None
        full = self.run_.fresh_model("cpu", vocab_size=self._vocab_size(), base_weights=False)
        assert state is not None  # rank 0 holds the gathered state
        full.load_state_dict(state)
        return full

    def _vocab_size(self) -> int | tuple[int, int]:
        source, target = self.task.tokenizer, self.task.target_tokenizer
        return source.vocab_size if target is None else (source.vocab_size, target.vocab_size)

    def save_last(self) -> None:
        self._check_finite()  # never save weights from after a non-finite step (nan_policy: stop)
        ranks = gather_to_main(self.dist, self._rank_state())
        optimizer_state = self._optimizer_state()
        model = self._checkpoint_model()
        if self.dist.is_main:
            state = {
                **asdict(self.loop),
                **self.stepper.state_dict(),
                "optimizer": optimizer_state,
                "ranks": ranks,
                "world_size": self.dist.world_size,
            }
            info = {
                "step": self.loop.step,
                "tokens_seen": self.loop.tokens_seen,
                "best_score": self.loop.best_score,
                "best_metric": self.tcfg.best_metric,
            }
            assert model is not None  # rank 0 always has the model to write
            self.run_.save_checkpoint("last", model, info=info, train_state=state)
        barrier(self.dist)
        self.last_save = _now()

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.setup.sharded:
            return self.stepper.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.model,
            self.stepper.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )

    def _restore(self) -> None:
        state = self.run_.train_state("cpu")
        saved_world = state.get("world_size", 1)
        sequential = not isinstance(getattr(self.task.batches, "batches", self.task.batches), RandomWindows)
        if saved_world != self.dist.world_size and sequential:
            raise ConfigError(
                f"resume: this run was checkpointed with {saved_world} process(es); its data order depends on "
                f"the process count, so resume it with {saved_world} (random-window runs may change it)",
                param="resume",
            )
        if self.setup.sharded:
            full = self.run_.fresh_model("cpu", vocab_size=self._vocab_size(), base_weights=False)
            self.run_.load_checkpoint_into(full, "last")
            load_full_state(self.model, self.stepper.optimizer, full.state_dict(), state["optimizer"])
            self.stepper.batches.load_state_dict(state["data"])
        else:
            self.run_.load_checkpoint_into(self.model, "last")
            self.stepper.load_state_dict(state)
        ranks = state.get("ranks") or [{"rng": state.get("rng"), "carried": state.get("carried")}]
        mine = ranks[self.dist.rank] if self.dist.rank < len(ranks) else ranks[0]
        self.task.objective.load_state_dict(mine)
        set_rng_state(mine["rng"])
        self.loop = LoopState(
            step=state["step"],
            tokens_seen=state["tokens_seen"],
            best_score=_saved_best(state),
            evals_since_best=state["evals_since_best"],
        )

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> bool:
        """Evaluate (every rank: sharded models need them all), log and keep the best weights (rank 0).

        Returns True when early stopping says stop; rank 0's decision is every rank's.
        """
        self._check_finite()
        with unsharded(self.model):
            metrics = self.task.evaluate()
            sample = self.task.sample(self.loop.step)
        improved = metrics.improves_on(self.loop.best_score)
        if improved:
            self.loop.best_score, self.loop.evals_since_best = metrics.score, 0
            model = self._checkpoint_model()
            if self.dist.is_main:
                info = {
                    "step": self.loop.step,
                    "tokens_seen": self.loop.tokens_seen,
                    "best_metric": metrics.key,
                    **{f"val_{k}": v for k, v in metrics.values.items() if k != "tokens"},
                }
                assert model is not None
                self.run_.save_checkpoint("best", model, info=info)
        else:
            self.loop.evals_since_best += 1
        if self.tracker is not None:
            self.tracker.log(
                self.loop.step, {f"val/{k}": v for k, v in metrics.values.items() if k != "tokens"}
            )
            self.tracker.text(self.loop.step, "sample", sample)
        self.bar.write(
            f"step {self.loop.step}: val {describe_metrics(metrics)}{' (best)' if improved else ''}"
        )
        stop = self.tcfg.patience is not None and self.loop.evals_since_best >= self.tcfg.patience
        return bool(from_main(self.dist, stop))

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, on_step: Callable[[int, float], None] | None = None) -> Path:
        """Step until max_steps, early stopping, a non-finite loss or a signal; log, evaluate, checkpoint."""
        loop, tcfg, max_steps = self.loop, self.tcfg, self.setup.max_steps
        window = LogWindow()
        self.model.train()
        if self.config.init_from and loop.step == 0:
            self.evaluate()  # a fine-tune's starting point: the base model's scores, in the same run
        try:
            with GracefulStop() as stop:
                while loop.step < max_steps:
                    lr = lr_at(loop.step, tcfg, max_steps)
                    result = self.stepper(lr)
                    self.watch.add(result.finite, loop.step + 1)  # on the device: no sync per step
                    loop.step += 1
                    loop.tokens_seen += result.tokens * self.dist.world_size
                    window.add(result, self.dist.world_size)
                    if on_step is not None:  # a per-step callback reads the loss: one sync per step
                        self._check_finite()
                        on_step(loop.step, float(result.loss))
                    at_end = loop.step == max_steps
                    if loop.step % tcfg.log_every == 0 or at_end:
                        self._log(window, lr, result)
                    evaluating = loop.step % tcfg.eval_every == 0 or at_end
                    stopped_early = evaluating and self.evaluate()
                    if evaluating:
                        window.restart_clock()  # tokens/s measures training only
                    if self._checkpoint_and_maybe_stop(stop, at_end or stopped_early):
                        break
        finally:
            self.bar.close()
            if self.tracker is not None:
                self.tracker.close()
        return self.run_dir

    def _check_finite(self) -> None:
        """Act on steps whose loss or gradient was not finite since the last check (their updates were
        skipped): stop (nan_policy stop) or warn (skip). Called before logging, evaluating, saving."""
        new, first, last = self.watch.new_bad_steps()
        if not new:
            return
        if self.tcfg.nan_policy == "stop":
            raise TrainingStopped(
                f"the loss or gradient became non-finite at step {first}; stopped without saving it. "
                f"The last good checkpoint is in {self.run_dir / 'checkpoints'} "
                "(lower train.lr, or set train.nan_policy: skip)",
                EXIT_NONFINITE,
            )
        where = f"step {last}" if new == 1 else f"{new} steps (the last at step {last})"
        self.bar.write(f"warning: non-finite loss or gradient at {where}; update skipped")

    def _log(self, window: LogWindow, lr: float, result: StepResult) -> None:
        self._check_finite()
        speed = window.tokens / max(time.perf_counter() - window.start, 1e-9)
        mean_loss = float(window.loss) / window.steps  # the one read of the device per log line
        if self.tracker is not None:
            self.tracker.log(
                self.loop.step,
                {
                    "train/loss": mean_loss,
                    "train/lr": lr,
                    "train/grad_norm": float(result.grad_norm),
                    "perf/tokens_per_sec": speed,
                    "train/epoch": self.loop.tokens_seen / max(1, self.task.tokens_per_epoch),
                    **{f"train/{key}": value / window.steps for key, value in window.extra.items()},
                },
            )
        self.bar.update(window.steps, loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{speed:,.0f}")
        window.reset()

    def _checkpoint_and_maybe_stop(self, stop: GracefulStop, finishing: bool) -> bool:
        """Save `last` when due; raise TrainingStopped after a signal; True when early stopping ends the run."""
        loop, tcfg = self.loop, self.tcfg
        signalled = any_rank(self.dist, stop.signal is not None, self.setup.device)  # all ranks stop together
        every = loop.step % (tcfg.checkpoint_every or tcfg.eval_every) == 0
        if every or finishing or signalled or self._save_is_overdue():
            self.save_last()
        if signalled:
            code = EXIT_SIGNAL.get(signal.Signals(stop.signal or signal.SIGTERM), EXIT_SIGNAL[signal.SIGTERM])
            raise TrainingStopped(
                f"interrupted at step {loop.step}/{self.setup.max_steps}; saved "
                f"{self.run_dir / 'checkpoints' / 'last'}. Resume with: {self.hint}",
                code,
            )
        if finishing and loop.step < self.setup.max_steps:
            self.bar.write(
                f"early stopping at step {loop.step}: no improvement in {tcfg.patience} evaluations"
            )
            return True
        return False

    def _save_is_overdue(self) -> bool:
        """train.checkpoint_every_minutes: that long since the last save (on any rank: all ranks save)."""
        minutes = self.tcfg.checkpoint_every_minutes
        overdue = minutes is not None and _now() - self.last_save >= 60.0 * minutes
        return minutes is not None and any_rank(self.dist, overdue, self.setup.device)


def _now() -> float:
    """Seconds on a monotonic clock (its own function, so tests can move time on)."""
    return time.monotonic()


def _saved_best(state: dict[str, Any]) -> float | None:
    """The best validation score of a training state (format 1 stored `best_val`, -BLEU for BLEU runs)."""
    if "best_score" in state:
        return state["best_score"]
    best = state.get("best_val", math.inf)
    return None if math.isinf(best) else best
