"""Compare lmzoo's byte-level pre-tokenizing (lmzoo.data.pretokens) with the `tokenizers` library's on every
code point this Python's Unicode data assigns (about 20 s). Run it after moving to another Python or
`tokenizers` version; it prints the characters the two place differently.

    python scripts/check_pretokens.py
"""

from __future__ import annotations

import sys
import time
import unicodedata

from tokenizers import pre_tokenizers

from lmzoo.data.pretokens import VERIFIED_UNICODE, pretokens

SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def probe(char: str) -> str:
    return f"a{char}a 1{char}1 {char}{char} x{char}' {char}s '{char} \t{char} {char}\n"


def agrees(chars: list[str]) -> bool:
    text = "".join(probe(c) for c in chars)
    found = pretokens(text)
    if found is None:  # a character without a shape goes to the library: nothing to compare
        return True
    return [BYTES.pre_tokenize_str(p)[0][0] for p in found] == [p for p, _ in SPLIT.pre_tokenize_str(text)]


def differing(chars: list[str]) -> list[str]:
    if agrees(chars):
        return []
    if len(chars) == 1:
        return chars
    half = len(chars) // 2
    return differing(chars[:half]) + differing(chars[half:])


def main() -> None:
    started = time.perf_counter()
    chars = [chr(c) for c in range(0x80, 0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    found = [c for start in range(0, len(chars), 4096) for c in differing(chars[start : start + 4096])]
    seconds = time.perf_counter() - started
    print(
        f"Unicode {unicodedata.unidata_version} (verified: {VERIFIED_UNICODE}): {len(chars):,} assigned "
        f"characters, {len(found)} placed differently ({seconds:.0f} s)"
    )
    for char in found[:50]:
        print(f"  U+{ord(char):04X} {unicodedata.category(char)} {unicodedata.name(char, '?')}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
