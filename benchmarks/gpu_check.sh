#!/bin/sh
# One prepared check of the GPU paths (issue 23): at most 8 minutes on one GPU; on a CPU machine it runs the CPU-only
# parts and says what it skipped. Writes gpu_check.json, gpu_check.md (and speed_cuda.json) into $OUT when set, else
# into result/gpu_check/. See benchmarks/gpu_check.py for the parts and their time limits.
cd "$(dirname "$0")/.." || exit 2
if [ -z "$PYTHON" ]; then  # the project's venv where there is one (make demo/test), else the machine's torch
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
