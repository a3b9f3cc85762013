"""Text in: corpora, tokenizers, examples and batches.

Tokenizer kinds register on import, like model families: char, word and bpe (lmzoo.data.tokenizer)
and a pretrained model's own (hf, lmzoo.data.pretrained_tokenizer); importing any module of this
package registers them all.
"""

from lmzoo.data import pretrained_tokenizer, tokenizer  # noqa: F401  (the tokenizer kinds register)
