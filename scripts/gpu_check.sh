#!/usr/bin/env bash
# GPU checks of the decode path on a CUDA machine without SGLang (the lent device machine): the `gpu` tests
# (Triton kernels vs torch references on CUDA, the plan's Triton attend vs the torch path, CUDA-graph capture of
# a layer's decode) and the decode-step benchmark with CUDA-graph replay and a dense SDPA baseline.
# Results go to $OUT (the device tool's folder) or benchmarks/results/gpu.
#   bash scripts/gpu_check.sh
set -uo pipefail
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
# sglang_hybridkv.kernels is the top-level kernels/ folder (pyproject's package-dir); without an install, link it.
[ -e sglang_hybridkv/kernels ] || ln -s ../kernels sglang_hybridkv/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
timeout "${TEST_TIMEOUT:-240}" $py -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
# BENCH_ARGS: a shorter sweep when little device time is left.
timeout "${BENCH_TIMEOUT:-300}" $py benchmarks/kernels.py --device cuda --graph \
  ${BENCH_ARGS:---tokens 4096 16384 --batch 1 16 64 --budgets 0.1 --profile} --json "$out/kernels-h200.json" 2>&1 \
  | tee "$out/kernels.log"
