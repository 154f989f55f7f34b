#!/usr/bin/env bash
# One call that runs every GPU test and benchmark of the project on a CUDA machine:
#   bash benchmarks/gpu_check.sh            (from anywhere; it cd's to the repo root)
# Each step is one `step "<name>" <command...>` line: append yours at the end of the list below.
# It prints what it runs, keeps going after a failure, and prints a summary in which a step whose
# tests all skipped (or whose benchmark printed a "skipped" JSON line) counts as SKIPPED, not passed.
# Exit status: 0 all steps passed; 1 a step failed (a wrong answer in bench_gpu_ask.py is a failure);
# 3 none failed but some skipped; 2 no CUDA GPU (nothing here may pass silently without one).
# Needs valley_rt importable with its dependencies (PyAV included) and ../shared beside the repo (the
# runtime test reads the original-layout fixtures and the snowmobile clip from there).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
unset TRITON_INTERPRET          # GPU tests run the compiled kernels, not the interpreter
unset VALLEY_RT_POOL_BACKEND    # and the runtime's own dispatch
PY="${PYTHON:-python}"

source benchmarks/gpu_steps.sh  # step and summary: a step is passed, SKIPPED or FAILED

echo "=== gpu_check on $(hostname) at $(date -u +%FT%TZ)"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch; nothing was run" >&2
    exit 2
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| cuda', torch.version.cuda)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# ---- steps: one line each; append new GPU tests and benchmarks below ---------------------------
step "temporal_pool kernel tests" "$PY" -m pytest tests/test_temporal_pool_kernel.py -rs
step "temporal_pool benchmark"    "$PY" benchmarks/bench_temporal_pool.py
step "runtime torch GPU path"      "$PY" -m pytest tests/test_runtime.py -q -rs -k torch_gpu
step "vision engine GPU tests"     "$PY" -m pytest tests/test_export_vision.py -q -rs -m gpu
step "ask: GPU path vs reference"  "$PY" benchmarks/bench_gpu_ask.py
step "trainer on CUDA"             "$PY" -m pytest tests/test_train.py -q -rs -m gpu
step "int4 linear + CUDA LLM/vision" "$PY" -m pytest tests/test_int4_linear.py tests/test_llm_cuda.py tests/test_vision_cuda.py -q -rs -m "not slow"
step "int4 CUDA-graph decode bench" "$PY" benchmarks/bench_gpu_llm.py
# -------------------------------------------------------------------------------------------------

summary
