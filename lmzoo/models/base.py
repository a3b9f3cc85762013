"""The model contract: what every family provides, so the rest of lmzoo never checks a type.

A language model (`LanguageModel`, kind "lm") maps ids (B, T) and an optional decoding state to
logits (B, T, V) and a new state. Given `targets`, it returns the mean token loss instead of the
logits, computed from the hidden state by the output head, so a loss never needs the full logits
tensor (which matters for an adaptive softmax) and a wrapped model (DDP, compile) is still called
through `forward`. A seq2seq model (`Seq2SeqModel`) has `encode` and `decode` instead.

Both answer, through `ZooModel`, what the trainer, PEFT, distributed training and benchmarks need
to know about a family: FSDP wrap units, adapter sites, default LoRA targets, FLOPs per token and
a tiny config for tests. Defaults below fit most families; a family overrides what differs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from lmzoo.models.heads import OutputHead

PAD_ID = 0  # every lmzoo tokenizer puts <pad> at id 0; losses ignore it


class ZooModel(nn.Module):
    """What lmzoo asks of every registered model besides its forward pass."""

    kind: ClassVar[str]  # "lm" (LanguageModel) or "seq2seq" (Seq2SeqModel)
    # LoRA: parameter-name patterns (fnmatch) adapted when finetune.targets is not given
    default_lora_targets: ClassVar[tuple[str, ...]] = ()
    head: OutputHead

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """The smallest sensible `model:` section (without `name`): tests and benchmarks build from it."""
        raise NotImplementedError(f"{cls.__name__} does not define tiny_config()")

    def fsdp_units(self) -> set[type[nn.Module]]:
        """Module types FSDP shards one by one (the repeated blocks); empty: shard the model whole."""
        return set()

    def decoding_slots(self, capacity: int) -> DecodingSlots:
        """A batched decoding state of `capacity` rows (`DecodingSlots`); LanguageModel and
        Seq2SeqModel say what a row takes."""
        raise NotImplementedError

    def adapter_sites(self) -> list[tuple[str, int]]:
        """(submodule name, output width) of every module a bottleneck adapter is inserted after."""
        return []

    def flops_per_token(self, seq_len: int, targets: torch.Tensor | None = None) -> float:
        """Matmul FLOPs of one token's forward pass (training costs 3x: forward + 2x backward).

        Linear layers count 2 * in * out, recurrent layers 2 * gates * H * (I + H), the output head
        what it computes for `targets` (an adaptive softmax's tail only for the share that reaches
        it), and every module with `attention_flops_per_token` adds that (scores and weighted values).
        """
        head_modules = {id(m) for m in self.head.modules()}
        total = self.head.flops_per_token(targets)
        for module in self.modules():
            if id(module) in head_modules:
                continue
            if isinstance(module, nn.Linear):
                total += 2 * module.in_features * module.out_features
            elif isinstance(module, nn.RNNBase):
                gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
                directions = 2 if module.bidirectional else 1
                for layer in range(module.num_layers):
                    inputs = module.input_size if layer == 0 else module.hidden_size * directions
                    total += directions * 2 * gates * module.hidden_size * (inputs + module.hidden_size)
            elif callable(recurrent := getattr(module, "recurrent_flops_per_token", None)):
                total += recurrent()
            if callable(attention := getattr(module, "attention_flops_per_token", None)):
                total += attention(seq_len)
        return total


class LanguageModel(ZooModel):
    kind = "lm"
    # True when training should carry the state from one batch to the next (truncated BPTT).
    carries_state = False

    @property
    def context_len(self) -> int | None:
        return None

    def init_state(self, batch_size: int) -> Any:
        """The state to pass with a prompt to start decoding (None: the model builds its own)."""
        return None

    def static_state(self, batch_size: int, *, compile: bool = False) -> Any:
        """A decoding state of fixed shapes (a static KV cache), whose one-token step can be compiled
        (`compile`; CUDA graphs on CUDA), giving the same tokens as `init_state`'s. None: the family has
        none, and generation uses `init_state`."""
        return None

    def decoding_slots(self, capacity: int) -> DecodingSlots:
        """A batched decoding state of `capacity` rows (see `DecodingSlots`); a row takes the state that
        `forward(prompt (1, T), init_state(1))` left. Families override it with one batched step; this
        default steps the rows one after another (correct for any family, not faster)."""
        return RowByRowSlots(lambda ids, state: self.hidden(ids, state), capacity)

    def hidden(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """The state the output layer reads, per position (B, T, C), and the new decoding state.

        kNN-LM datastores and probes use it as the representation of the text up to each position.
        """
        raise NotImplementedError

    def forward(
        self,
        ids: torch.Tensor,
        state: Any = None,
        targets: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        per_sequence: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """(logits (B, T, V), state), or (mean loss over targets != pad, state) when targets are given, or
        with `per_sequence` (each row's summed log-probability of its targets (B,), state): log pi(y|x)
        for preference tuning, the output layer run on the target positions only."""
        h, state = self.hidden(ids, state)  # (B, T, C)
        if targets is None:
            return self.head.logits(h), state
        if per_sequence:
            return self.head.sequence_logprobs(h, targets, ignore_index=PAD_ID), state
        return self.head.loss(h, targets, ignore_index=PAD_ID, label_smoothing=label_smoothing), state


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the duration; the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """`fn` applied to every tensor inside nested tuples/lists/dicts; anything else kept as is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value


def detach_state(state: Any) -> Any:
    """Cut the autograd history of a carried state (tensors inside tuples/lists/dicts)."""
    return map_tensors(torch.Tensor.detach, state)


def seq2seq_vocab_sizes(vocab_size: int | tuple[int, int], share_embeddings: bool) -> tuple[int, int]:
    """(source, target) vocabulary sizes: one int means a shared tokenizer."""
    src_vocab, tgt_vocab = (vocab_size, vocab_size) if isinstance(vocab_size, int) else vocab_size
    if share_embeddings and src_vocab != tgt_vocab:
        raise ValueError("share_embeddings needs one vocabulary for source and target")
    return src_vocab, tgt_vocab


class Seq2SeqModel(ZooModel):
    """An encoder-decoder: `encode(src, src_mask) -> memory`, `decode(tgt, memory, src_mask, state)`.

    src_mask is (B, S) bool, True at padding. Greedy, sampling and beam search (lmzoo.inference.seq2seq)
    are written once against this contract; a model adds `init_decode_state` (what incremental
    decoding starts from) and `reorder_state` (beam search's reshuffle of hypotheses).
    """

    kind = "seq2seq"

    @property
    def max_source_len(self) -> int | None:
        """Longest source (in tokens, <eos> included) the encoder has positions for; None: no limit."""
        return None

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode_hidden(
        self, tgt: torch.Tensor, memory: Any, src_mask: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def init_decode_state(self, memory: Any, src_mask: torch.Tensor) -> Any:
        raise NotImplementedError

    def reorder_state(self, state: Any, indices: torch.Tensor) -> Any:
        raise NotImplementedError

    def decoding_slots(self, capacity: int) -> DecodingSlots:
        """A batched decoding state of `capacity` rows; a row takes (memory, src_mask, state) of one
        source after its first decoding step. This default steps the rows one after another."""

        def step(tokens: torch.Tensor, single: Any) -> tuple[torch.Tensor, Any]:
            memory, src_mask, state = single
            h, state = self.decode_hidden(tokens, memory, src_mask, state)
            return h, (memory, src_mask, state)

        return RowByRowSlots(step, capacity)

    def decode(
        self, tgt: torch.Tensor, memory: Any, src_mask: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, Any]:
        """Logits (B, T, V) of the next target tokens, and the state to continue from."""
        h, state = self.decode_hidden(tgt, memory, src_mask, state)
        return self.head.logits(h), state

    def forward(
        self,
        src: torch.Tensor,
        tgt_in: torch.Tensor,
        targets: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, None]:
        """Teacher forcing: (logits (B, T, V), None), or (mean loss over non-pad targets, None)."""
        src_mask = src == PAD_ID
        memory = self.encode(src, src_mask)
        h, _ = self.decode_hidden(tgt_in, memory, src_mask)
        if targets is None:
            return self.head.logits(h), None
        return self.head.loss(h, targets, ignore_index=PAD_ID, label_smoothing=label_smoothing), None


def select_rows(value: Any, indices: torch.Tensor) -> Any:
    """Pick batch rows (dim 0) of every tensor inside tuples/lists/dicts (beam search's memory shuffle)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.index_select(0, indices)
    if isinstance(value, (list, tuple)):
        return type(value)(select_rows(v, indices) for v in value)
    if isinstance(value, dict):
        return {k: select_rows(v, indices) for k, v in value.items()}
    raise TypeError(f"cannot select rows of {type(value).__name__}")


class DecodingSlots:
    """A batched decoding state: `capacity` rows, each holding one sequence at its own length.

    Rows [0, active) are in use. `add(state, index, length)` copies row `index` of the state a prefill
    left (what the model returned for prompts read together, `length` tokens of this one) into the next
    free row; `free(row)` releases a row, moving the last active row into it so the rows in use stay
    packed and a step reads one block; `step(tokens)` feeds every active row its next token (n,) and
    returns the features the output head reads (n, C). `prefill` says how prompts may be read together
    (lmzoo.inference.prefill): "padded" (any lengths, right-padded), "equal" (one length per pass) or
    "alone". A family implements `put`, `move` and `step`; the engine (lmzoo.inference.engine) drives it.
    """

    prefill = "equal"

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.active = capacity, 0

    def add(self, single: Any, index: int = 0, length: int = 0) -> int:
        """Take row `index` of a prefill's state (`length` tokens read) into the next free row; return it."""
        if self.active >= self.capacity:
            raise ValueError(f"all {self.capacity} rows are in use")
        row = self.active
        self.put(row, single, index, length)
        self.active += 1
        return row

    def free(self, row: int) -> int | None:
        """Release `row`; the row whose sequence moved into it (the last active one), or None."""
        if not 0 <= row < self.active:
            raise ValueError(f"row {row} is not in use")
        self.active -= 1
        if row == self.active:
            return None
        self.move(self.active, row)
        return self.active

    def put(self, row: int, single: Any, index: int, length: int) -> None:
        raise NotImplementedError

    def move(self, source: int, target: int) -> None:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RowByRowSlots(DecodingSlots):
    """Rows kept as separate single-sequence states and stepped one after another: `step_one(ids (1, 1),
    state) -> (features (1, 1, C), state)`. What a family without a batched state gets."""

    prefill = "alone"  # a row keeps the state of its own prefill, whatever its shape

    def __init__(
        self, step_one: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]], capacity: int
    ) -> None:
        super().__init__(capacity)
        self.step_one = step_one
        self.states: list[Any] = [None] * capacity

    def put(self, row: int, single: Any, index: int, length: int) -> None:
        self.states[row] = single

    def move(self, source: int, target: int) -> None:
        self.states[target], self.states[source] = self.states[source], None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        features = []
        for row in range(len(tokens)):
            h, self.states[row] = self.step_one(tokens[row : row + 1, None], self.states[row])
            features.append(h[:, -1])  # (1, C)
        return torch.cat(features)  # (n, C)
