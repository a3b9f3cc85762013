#!/usr/bin/env bash
# lmzoo's GPU check, for a machine with an NVIDIA GPU and PyTorch (nothing is fetched from the network):
# the CUDA-marked tests, then scripts/gpu_check.py's figures (matmul peak; gpt_gpu.yaml and modern_gpu.yaml
# eager / compiled / CUDA graphs with tokens/s and MFU; time to the best validation loss with early stopping;
# transformer.yaml with token batches and its test BLEU; decoding with a dynamic, static and CUDA-graph KV
# cache against recomputing; LoRA on a cuDNN LSTM). Pick parts with --parts (see gpu_check.py --help).
#   bash scripts/gpu_check.sh [--steps 60] [--parts peak,train,decode] [--json gpu.json]
#   bash scripts/gpu_check.sh --dry-run      # on a CPU: every part at tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py tests/test_speed.py tests/test_decoder.py
tests=$?
[ "$tests" -eq 5 ] && tests=0  # no test collected (a CPU dry run): not a failure
PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py "$@"
exit $(( tests || $? ))
