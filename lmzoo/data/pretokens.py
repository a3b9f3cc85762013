"""The byte-level BPE pre-tokenizer's split of a text (GPT-2's pattern), computed by Python's `re`.

The `tokenizers` library splits text with GPT-2's pattern

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

through Oniguruma, at 1 to 2 MB/s per core on text that is not all ASCII. On ASCII the classes are
small sets and `re` runs the same pattern (ASCII_PRETOKENS). Other text is first written as its *shape*:
each character replaced by an ASCII character the pattern treats alike (a letter by "a", a number by
"0", whitespace other than " " by "\t", anything else by "!"; ASCII characters stay themselves). The
shape's pre-tokens have the lengths of the text's, so the text is cut where its shape is.

Which class a character is in comes from Python's Unicode data. Python 3.11's (Unicode 14.0.0) was
compared with the library's pattern on every assigned code point (scripts/check_pretokens.py; the tests
check a sample). With other Unicode data, a character whose class differs from its class in Unicode 3.2
has no shape (an unassigned character is in the class "anything else", as in a pattern that does not
know it). Text with a character without a shape (unassigned here, a surrogate) is left to the library.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np

_SPACE = " \t\n\x0b\x0c\r"  # \s of the pattern, on ASCII
ASCII_PRETOKENS = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_SPACE}A-Za-z0-9]+|[{_SPACE}]+(?![^{_SPACE}])|[{_SPACE}]+"
)
OTHER_SPACE = frozenset(
    "\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
)
VERIFIED_UNICODE = "14.0.0"  # the Unicode data compared with the library's on every code point
NO_SHAPE = 0xFF
CUT = "\uffff"  # a noncharacter: unassigned, so without a shape
LETTER, NUMBER, SPACE, OTHER = ord("a"), ord("0"), ord("\t"), ord("!")


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
    if text.isascii():
        return ASCII_PRETOKENS.findall(text)
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    shape = np.take(shapes(), codes)
    if shape.max(initial=0) == NO_SHAPE:
        return None
    found = ASCII_PRETOKENS.findall(shape.tobytes().decode("ascii"))
    lengths = np.fromiter(map(len, found), dtype=np.int64, count=len(found))
    # The text with CUT (a character without a shape, so not in it) between pre-tokens, split at CUT.
    cut = np.insert(codes, np.cumsum(lengths)[:-1], ord(CUT))
    return cut.tobytes().decode("utf-32-le", "surrogatepass").split(CUT)
