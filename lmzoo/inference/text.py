"""Between ids and text: prompts in, streamed pieces out, and the one stop-string rule.

`TextStream` turns generated ids into text pieces as soon as they decode cleanly (whole characters,
the right word spacing). `StopFilter` holds back any end of the text that could still grow into a stop
string and cuts the text where the first stop string begins, so no caller ever sees part of a stop.
It works on (piece, payload) items, so a token's probabilities travel with its text. A language
model's prompt is read by `encode_prompt`, a seq2seq model's source by `encode_source`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import torch

from lmzoo.data.tokenizer import Tokenizer
from lmzoo.models.base import Seq2SeqModel

T = TypeVar("T")


class TextStream:
    """Turns ids into text pieces as soon as they decode cleanly (whole characters, word spacing)."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context)[-1:]  # one token of context gives the right spacing for the first piece
        self.prefix, self.read = 0, len(self.ids)

    def push(self, token_id: int) -> str:
        """The new text this token completes ("" while a character's bytes are still incomplete)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever text is still held (an incomplete character decodes as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the earliest stop string begins in `text[start:]` (an index into `text`), or None."""
    hits = [found for stop in stops if stop and (found := text.find(stop, start)) >= 0]
    return min(hits) if hits else None


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (it may still grow)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class StopFilter(Generic[T]):
    """Releases (piece, payload) items whose text can no longer be part of a stop string.

    An item is held while its text reaches into the end of the output that could still become a stop
    string; once a stop string appears, the items before it are released (the one it starts in cut at
    its start) and nothing more is. Without stop strings every item is released at once.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.held: list[tuple[str, T]] = []
        self.text = ""  # the held items' text
        self.stopped = False

    def push(self, piece: str, payload: T) -> list[tuple[str, T]]:
        """Add one item; return the items that are now safe to show."""
        if self.stopped:
            return []
        self.held.append((piece, payload))
        if not self.stops:
            return self._release(len(self.held))
        searched_from = max(0, len(self.text) - max(len(s) for s in self.stops) + 1)
        self.text += piece
        cut = first_stop(self.text, self.stops, searched_from)
        if cut is not None:
            self.stopped = True
            return self._cut(cut)
        keep_from = len(self.text) - partial_stop_length(self.text, self.stops)
        end, ready = 0, 0
        for index, (item, _) in enumerate(self.held):
            end += len(item)
            if end > keep_from:
                break
            ready = index + 1
        return self._release(ready)

    def finish(self, tail: str = "") -> list[tuple[str, T]]:
        """The end of the output: `tail` (a stream's flush) joins the last item; release what is left."""
        if self.stopped or not self.held:
            return []
        piece, payload = self.held[-1]
        self.held[-1] = (piece + tail, payload)
        self.text += tail
        cut = first_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._cut(cut)
        return self._release(len(self.held))

    def _release(self, count: int) -> list[tuple[str, T]]:
        out, self.held = self.held[:count], self.held[count:]
        self.text = self.text[sum(len(piece) for piece, _ in out) :]
        return out

    def _cut(self, cut: int) -> list[tuple[str, T]]:
        """The held items up to character `cut` (the last one shortened); the rest are dropped."""
        out, start = [], 0
        for piece, payload in self.held:
            if start >= cut:
                break
            out.append((piece[: cut - start], payload))
            start += len(piece)
        self.held, self.text = [], ""
        return out


def encode_prompt(tokenizer: Tokenizer, prompt: str, warn: Callable[[str], None] | None = None) -> list[int]:
    """Prompt ids; unseen characters or words become <unk> with one warning; "" starts a new line."""
    unknown = tokenizer.unknown_pieces(prompt)
    if unknown and warn is not None:
        shown = ", ".join(repr(p) for p in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        warn(
            f"warning: {len(unknown)} piece(s) of the prompt are not in the vocabulary ({shown}); read as <unk>"
        )
    ids = tokenizer.encode(prompt)
    return ids or start_ids(tokenizer)


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt starts from: a line break when the vocabulary has one, else <bos>."""
    newline = tokenizer.encode("\n")
    return newline if newline and tokenizer.unk_id not in newline else [tokenizer.bos_id]


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of one token on its own; special tokens by name (<eos>, <unk>...)."""
    text = tokenizer.decode([token_id])
    if text and text != "\ufffd":
        return text
    return tokenizer.special_name(token_id) or text


def token_pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text ("" for a byte that only completes a character later)."""
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    if pieces:
        pieces[-1] += stream.flush()
    return pieces


def encode_source(
    model: Seq2SeqModel, tokenizer: Tokenizer, text: str, warn: Callable[[str], None] | None = None
) -> torch.Tensor:
    """(1, S) source ids as training saw them: tokens + <eos>, cut to the positions the encoder has
    (`model.max_source_len`, as translate_corpus does); unseen pieces and a cut are warned about."""
    ids = encode_prompt(tokenizer, text, warn) if text else []
    limit = model.max_source_len
    if limit is not None and len(ids) + 1 > limit:
        if warn is not None:
            warn(
                f"warning: the text is {len(ids) + 1} tokens long with <eos>, more than the model's "
                f"{limit} source positions; translating its first {limit - 1} tokens"
            )
        ids = ids[: limit - 1]
    device = next(model.parameters()).device
    return torch.tensor([ids + [tokenizer.eos_id]], device=device)
