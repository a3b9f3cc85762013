#!/usr/bin/env bash
# lmzoo's GPU check, for a machine with an NVIDIA GPU and PyTorch (nothing is fetched from the network):
# the CUDA-marked tests, then scripts/gpu_check.py's figures (matmul peak, gpt_gpu.yaml in fp32 / bf16 /
# bf16 + torch.compile with tokens/s and MFU, KV-cache decoding, LoRA on a cuDNN LSTM).
#   bash scripts/gpu_check.sh [--steps 60] [--json gpu.json]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
tests=$?
PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py "$@"
exit $(( tests || $? ))
