"""Looking at runs: attention maps, tokenizer comparison, plots, `lmzoo compare` and `lmzoo report`."""
