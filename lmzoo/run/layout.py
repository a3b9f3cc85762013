"""The names of the files in a run directory. Only the run package reads or writes them by name.

runs/<name>/
  config.yaml            the resolved config that ran (every default filled in)
  tokenizer.json         the tokenizer (the source side of a seq2seq run)
  target_tokenizer.json  seq2seq runs with a separate target-side tokenizer
  base.json              fine-tunes: where the init_from run is (relative) and a hash of its weights
  checkpoints/last|best  weights, training state and info.json (lmzoo.run.checkpoint)
  metrics.jsonl          one JSON object per logged step (lmzoo.run.metrics reads it)
  events.out.tfevents.*  TensorBoard
"""

CONFIG_FILE = "config.yaml"
BASE_FILE = "base.json"
TOKENIZER_FILE = "tokenizer.json"
TARGET_TOKENIZER_FILE = "target_tokenizer.json"
METRICS_FILE = "metrics.jsonl"
