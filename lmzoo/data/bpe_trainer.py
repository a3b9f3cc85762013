"""Byte-level BPE learned from pre-token counts: the merges the `tokenizers` library's trainer learns.

The library's trainer reads text, splits it into pre-tokens and counts them, then merges. Its counting
runs at about 4 MB/s per core; lmzoo counts pre-tokens itself (lmzoo.data.pretokens: about twice as
fast, and while the corpus is encoded, lmzoo.data.bpe_pass) and learns the merges here from the counts,
as the library's trainer does (`BpeTrainer::do_train`, tokenizers 0.23):

* ids: the special tokens, then the 256 byte characters ordered by code point, then merged tokens;
* pairs are counted per distinct word (weighted by its count); a queue pops the most frequent pair, the
  smaller pair (by ids) first on ties; an entry whose count is out of date goes back with its count;
* merging a pair in a word updates the counts of its neighbours' pairs (never of the pair itself) and
  queues the pairs it made, with the words they were made in; a merge that makes a token already in the
  vocabulary reuses its id; learning stops at the vocabulary size or below `min_frequency`.

The tokenizer is then the one the library builds (tests compare them on varied text).
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from lmzoo.data.pretokens import pretokens

Pair = tuple[int, int]


def byte_characters() -> list[str]:
    """The character that stands for each byte in byte-level BPE (GPT-2's table): printable Latin-1
    characters stand for themselves, the other bytes for U+0100 onwards, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


def count_pretokens(texts: Iterable[str], counts: Counter[str] | None = None) -> Counter[str]:
    """How often each pre-token occurs in the texts (each text split on its own)."""
    counts = Counter() if counts is None else counts
    for text in texts:
        counts.update(all_pretokens(text))
    return counts


def all_pretokens(text: str) -> list[str]:
    """The library's pre-tokens of `text`: by lmzoo.data.pretokens, else by the library itself."""
    found = pretokens(text)
    if found is not None:
        return found
    from tokenizers import pre_tokenizers

    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return [text[start:end] for _, (start, end) in splitter.pre_tokenize_str(text)]


class _Merger:
    """The state of learning merges: the words as ids, the pair counts, the queue."""

    def __init__(self, words: list[list[int]], counts: list[int]) -> None:
        self.words, self.counts = words, counts
        self.pairs: defaultdict[Pair, int] = defaultdict(int)
        where: defaultdict[Pair, set[int]] = defaultdict(set)
        for index, word in enumerate(words):
            count = counts[index]
            for pair in zip(word, word[1:], strict=False):
                self.pairs[pair] += count
                where[pair].add(index)
        self.queue: list[tuple[int, Pair, int]] = []  # (-count, pair, entry): a min-heap
        self.entries: dict[int, set[int]] = {}  # entry -> the words its pair was counted in
        self.serial = 0  # the last entry's number
        self._queue(where)

    def _queue(self, where: dict[Pair, set[int]]) -> None:
        for pair, positions in where.items():
            if self.pairs[pair] > 0:
                self.serial += 1
                self.entries[self.serial] = positions
                heapq.heappush(self.queue, (-self.pairs[pair], pair, self.serial))

    def best(self, min_frequency: int) -> tuple[Pair, set[int]] | None:
        """The next pair to merge and the words to merge it in; None when learning stops."""
        while self.queue:
            negative, pair, entry = heapq.heappop(self.queue)
            count = self.pairs[pair]
            if -negative != count:
                heapq.heappush(self.queue, (-count, pair, entry))
                continue
            positions = self.entries.pop(entry)
            return None if count < 1 or count < min_frequency else (pair, positions)
        return None

    def merge(self, pair: Pair, new: int, positions: set[int]) -> None:
        """Merge `pair` into `new` in the words at `positions`; queue the pairs this makes."""
        first, second = pair
        pairs, made = self.pairs, defaultdict(set)
        for index in positions:
            word, count = self.words[index], self.counts[index]
            length, i = len(word), 0
            while i < length - 1:
                if word[i] == first and word[i + 1] == second:
                    if i > 0:
                        before = word[i - 1]
                        pairs[before, first] -= count
                        pairs[before, new] += count
                        made[before, new].add(index)
                    word[i : i + 2] = [new]
                    length -= 1
                    if i < length - 1:
                        after = word[i + 1]
                        pairs[second, after] -= count
                        pairs[new, after] += count
                        made[new, after].add(index)
                i += 1
        self._queue(made)


def learn_merges(
    counts: Counter[str] | dict[str, int], vocab_size: int, min_frequency: int, specials: Iterable[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and merges (in rank order) BPE learns from pre-token counts."""
    tokens = [*specials, *sorted(byte_characters())]
    ids = {token: index for index, token in enumerate(tokens)}
    byte_ids = [ids[character] for character in byte_characters()]
    words = [[byte_ids[b] for b in word.encode("utf-8")] for word in counts]
    merger = _Merger(words, list(counts.values()))
    ranks: dict[Pair, int] = {}  # a pair merged twice keeps its later rank, as in the library
    merged = 0
    while len(ids) < vocab_size:
        found = merger.best(min_frequency)
        if found is None:
            break
        pair, positions = found
        token = tokens[pair[0]] + tokens[pair[1]]
        new = ids.setdefault(token, len(tokens))
        if new == len(tokens):
            tokens.append(token)
        ranks[pair], merged = merged, merged + 1
        merger.merge(pair, new, positions)
    order = sorted(ranks, key=ranks.__getitem__)
    return ids, [(tokens[a], tokens[b]) for a, b in order]


def bpe_backend(vocab: dict[str, int], merges: list[tuple[str, str]], specials: Iterable[str]) -> Any:
    """A `tokenizers` Tokenizer of byte-level BPE with this vocabulary and these merges."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    # Split on byte-level pieces without a prefix space: encode/decode is then an exact round trip.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(specials))
    return backend


def train_bpe(counts: Counter[str] | dict[str, int], config: Any, specials: Iterable[str]) -> Any:
    """The byte-level BPE tokenizer `config` (vocab_size, min_freq) describes, learned from pre-token
    counts."""
    vocab, merges = learn_merges(counts, config.vocab_size, config.min_freq, specials)
    return bpe_backend(vocab, merges, specials)
