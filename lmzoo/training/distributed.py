"""Data-parallel training with PyTorch's own engine: torchrun, torch.distributed, DDP and FSDP.

`torchrun --nproc_per_node=N -m lmzoo train cfg.yaml` starts N processes; each reads its rank from
the environment torchrun sets. Every rank draws the same *global* batch (per-rank batch x world
size) from the same seeded generator and keeps its own slice of rows, so ranks see disjoint data
and N processes x batch b compute exactly what 1 process x batch N*b computes. Rank 0 alone
writes files; the other ranks send it what a checkpoint needs from them (their RNG states and
carried recurrent states).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from lmzoo.errors import ConfigError, DataError, LmzooError
from lmzoo.models.base import ZooModel, map_tensors

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def init_distributed(device_request: str, timeout_s: float = 120.0) -> DistContext:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_request.split(":")[0] in ("auto", "cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {rank} wants cuda:{local_rank} but {torch.cuda.device_count()} GPU(s) are visible; "
                "lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # A bounded timeout: if a peer dies, the others fail fast instead of waiting forever.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(ctx: DistContext, device: torch.device) -> torch.device:
    """Each rank on its own GPU."""
    return torch.device("cuda", ctx.local_rank) if ctx.enabled and device.type == "cuda" else device


class ShardedBatches:
    """This rank's rows of each global batch (the wrapped source draws per-rank batch x world size), or,
    for a source with `next_for_rank` (lmzoo.data.token_batches), this rank's batch of the step."""

    def __init__(self, batches: Any, ctx: DistContext) -> None:
        self.batches, self.ctx = batches, ctx

    def __len__(self) -> int:
        if self.per_rank:  # each step takes world_size of the source's batches
            return max(1, len(self.batches) // self.ctx.world_size)
        return len(self.batches)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batches, name)

    @property
    def per_rank(self) -> bool:
        """A source whose batches are defined per rank (token-count batches: rows differ per batch)."""
        return hasattr(self.batches, "next_for_rank")

    def next(self) -> Any:
        if self.per_rank:
            return self.batches.next_for_rank(self.ctx.rank, self.ctx.world_size)
        batch = self.batches.next()
        rows = next(v.shape[0] for v in batch if isinstance(v, torch.Tensor)) // self.ctx.world_size
        start = self.ctx.rank * rows
        return type(batch)(*(v[start : start + rows] if isinstance(v, torch.Tensor) else v for v in batch))

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def any_rank(ctx: DistContext, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any rank (all ranks agree, e.g. on stopping after SIGTERM)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_ranks(ctx: DistContext, value: Any, device: torch.device) -> Any:
    """The mean of a number over all ranks (each rank's loss -> the global batch's loss).

    A 0-dim tensor stays on the device (the training step reads no value back); a float is a float.
    """
    if not ctx.enabled:
        return value
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to(device=device, dtype=dtype).reshape(1).clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor[0] / ctx.world_size
    tensor = torch.tensor([value], dtype=dtype, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / ctx.world_size


def from_main(ctx: DistContext, value: Any) -> Any:
    """Rank 0's value, on every rank (decisions such as early stopping)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(
    ctx: DistContext, first: Callable[[], T], then: Callable[[], T], timeout_s: float = 86_400
) -> T:
    """Rank 0 runs `first` (preparing a corpus: minutes, maybe hours) while the other ranks wait for it on a
    group of their own with a long timeout; then they run `then`. A failure on rank 0 fails every rank."""
    if not ctx.enabled:
        return first()
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        if ctx.is_main:
            failure: str | None = "rank 0 stopped"
            try:
                result = first()
                failure = None
                return result
            except LmzooError as err:
                failure = str(err)
                raise
            finally:
                dist.broadcast_object_list([failure], src=0, group=group)
        box: list[str | None] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is not None:
            raise DataError(f"rank {ctx.rank}: rank 0 could not prepare the data ({box[0]})")
        return then()
    finally:
        dist.destroy_process_group(group)


def gather_to_main(ctx: DistContext, value: Any) -> list[Any] | None:
    """Every rank's value, as a list on rank 0 (None elsewhere)."""
    if not ctx.enabled:
        return [value]
    found: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(map_tensors(torch.Tensor.cpu, value), found, dst=0)
    return found


def wrap_model(
    model: torch.nn.Module, ctx: DistContext, device: torch.device, strategy: str
) -> torch.nn.Module:
    """The module the training step calls: DDP, FSDP (fully_shard, in place), or the model itself."""
    if not ctx.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        units = tuple(cast(ZooModel, model).fsdp_units())  # the model says which blocks to shard one by one
        for module in model.modules():
            if units and isinstance(module, units):
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[None]:
    """FSDP: gather every shard for calls that bypass the forward hooks (evaluation, sampling)."""
    # a sharded model has imported FSDP already; importing it here would cost every start half a second
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)  # None: torch without FSDP2, nothing is sharded
    sharded = [m for m in model.modules() if module_type is not None and isinstance(m, module_type)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if ctx.enabled:
        dist.barrier()


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
) -> None:
    """Load full (unsharded) model and optimiser state dicts into an FSDP model; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def full_state_dict(model: torch.nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """An FSDP model's whole state dict gathered on rank 0 (on CPU), None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast(dict[str, torch.Tensor], state) if ctx.is_main else None
