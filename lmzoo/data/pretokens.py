"""The byte-level BPE pre-tokenizer's split of a text (GPT-2's pattern), computed with numpy.

The `tokenizers` library splits text with GPT-2's pattern

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

through Oniguruma, at 1 to 2 MB/s per core on text that is not all ASCII. On ASCII the classes are
small sets, and where the pattern cuts follows from each character's class and its neighbours' (`starts`),
in array operations (about twice as fast as Python's `re` running the same pattern). Other text is first
written as its *shape*: each character replaced by an ASCII character the pattern treats alike (a letter
by "a", a number by "0", whitespace other than " " by "\t", anything else by "!"; ASCII characters stay
themselves). The shape's pre-tokens have the lengths of the text's, so the text is cut where its shape is.

Which class a character is in comes from Python's Unicode data. Python 3.11's (Unicode 14.0.0) was
compared with the library's pattern on every assigned code point (scripts/check_pretokens.py; the tests
check a sample). With other Unicode data, a character whose class differs from its class in Unicode 3.2
has no shape (an unassigned character is in the class "anything else", as in a pattern that does not
know it). Text with a character without a shape (unassigned here, a surrogate) is left to the library.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np

OTHER_SPACE = frozenset(
    "\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
)
VERIFIED_UNICODE = "14.0.0"  # the Unicode data compared with the library's on every code point
NO_SHAPE = 0xFF
CUT = "\uffff"  # a noncharacter: unassigned, so without a shape
LETTER, NUMBER, SPACE, OTHER = ord("a"), ord("0"), ord("\t"), ord("!")
# The pattern's classes of ASCII characters: \p{L}, \p{N}, \s and anything else.
LETTERS, NUMBERS, SPACES, OTHERS = 1, 2, 3, 4
ASCII_CLASSES = np.full(256, OTHERS, dtype=np.uint8)
ASCII_CLASSES[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", np.uint8)] = LETTERS
ASCII_CLASSES[np.frombuffer(b"0123456789", np.uint8)] = NUMBERS
ASCII_CLASSES[np.frombuffer(b" \t\n\x0b\x0c\r", np.uint8)] = SPACES
TWO_LETTER_ENDS = np.isin(np.arange(256), np.frombuffer(b"stmd", np.uint8))  # 's 't 'm 'd
QUOTE, BLANK, MARK = ord("'"), ord(" "), 0xFF  # MARK: not ASCII, so not in ASCII text


@functools.cache
def shapes() -> np.ndarray:
    """For every code point, the ASCII character it is written as in a shape (NO_SHAPE: none)."""
    table = np.full(0x110000, NO_SHAPE, dtype=np.uint8)
    table[:128] = np.arange(128)
    verified, old = unicodedata.unidata_version == VERIFIED_UNICODE, unicodedata.ucd_3_2_0
    for code in range(128, 0x110000):
        char = chr(code)
        kind = unicodedata.category(char)
        if kind in ("Cn", "Cs") or not (verified or _class(old.category(char)) == _class(kind)):
            continue
        table[code] = SPACE if char in OTHER_SPACE else _class(kind)
    return table


def _class(category: str) -> int:
    return LETTER if category[0] == "L" else NUMBER if category[0] == "N" else OTHER


def pretokens(text: str) -> list[str] | None:
    """The library's pre-tokens of `text` (None when a character has no shape)."""
    if not text:
        return []
    if text.isascii():
        data = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        # The text with MARK before each pre-token but the first, read as Latin-1 and split at MARK.
        return np.insert(data, starts(data)[1:], MARK).tobytes().decode("latin-1").split(chr(MARK))
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    shape = np.take(shapes(), codes)
    if shape.max(initial=0) == NO_SHAPE:
        return None
    # The text with CUT (a character without a shape, so not in it) between pre-tokens, split at CUT.
    cut = np.insert(codes, starts(shape)[1:], ord(CUT))
    return cut.tobytes().decode("utf-32-le", "surrogatepass").split(CUT)


def starts(data: np.ndarray) -> np.ndarray:
    """Where the pattern's pieces of the ASCII text `data` (bytes as uint8, not empty) start.

    A piece starts where the class changes (letters, numbers, whitespace, anything else), except that
    * a whitespace run followed by other text ends in a piece of its own (its last character), and a " "
      there is the first character of the next piece instead (" ?\\p{L}+" and its kind);
    * where a piece may start with "'" (at the start, or after a letter, number or whitespace other than
      " "), "'s", "'t", "'m", "'d", "'re", "'ve" and "'ll" are pieces of their own.
    """
    size, kinds = len(data), ASCII_CLASSES[data]
    start = np.empty(size, dtype=bool)
    start[0] = True
    np.not_equal(kinds[1:], kinds[:-1], out=start[1:])
    space = kinds == SPACES
    ends = np.flatnonzero(space[:-1] & ~space[1:]) + 1  # the first character after a whitespace run
    start[ends[(ends >= 2) & space[np.maximum(ends - 2, 0)]] - 1] = True
    start[ends[data[ends - 1] == BLANK]] = False
    quotes = np.flatnonzero(data == QUOTE)
    before = np.maximum(quotes - 1, 0)
    quotes = quotes[(quotes == 0) | ((kinds[before] != OTHERS) & (data[before] != BLANK))]
    if len(quotes):
        padded = np.concatenate([data, np.zeros(2, dtype=np.uint8)])
        first, second = padded[quotes + 1], padded[quotes + 2]
        three = (np.isin(first, (ord("r"), ord("v"))) & (second == ord("e"))) | (
            (first == ord("l")) & (second == ord("l"))
        )
        length = np.where(three, 3, np.where(TWO_LETTER_ENDS[first], 2, 0))
        found, length = quotes[length > 0], length[length > 0]
        start[found + 1] = False
        after = found + length
        start[after[after < size]] = True
    return np.flatnonzero(start)
