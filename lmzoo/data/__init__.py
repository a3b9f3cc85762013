"""Text and examples in, batches out: tokenizers (`tokenizer`), corpus files and their splits (`corpus`),
language-model batch sources (`streams`), sentence pairs and records (`examples`, `token_batches`), and the
batch types objectives read (`batch`)."""
