"""Text and examples in, batches out: tokenizers (`tokenizer`, and a pretrained model's own in
`pretrained_tokenizer`), corpus sources, splits and prepared token files (`sources`, `corpus`,
`prepare`), language-model batch sources (`streams`), sentence pairs and records (`examples`,
`token_batches`), and the batch types objectives read (`batch`).

Tokenizer kinds register on import, like model families: char, word and bpe (lmzoo.data.tokenizer)
and a pretrained model's own (hf, lmzoo.data.pretrained_tokenizer); importing any module of this
package registers them all.
"""

from lmzoo.data import pretrained_tokenizer, tokenizer  # noqa: F401  (the tokenizer kinds register)
