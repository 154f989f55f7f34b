#!/usr/bin/env bash
# CI: the engine-path tests in an environment that has no torch installed at all: a second virtual
# environment with the core install only (`pip install .`: onnxruntime, av, numpy, pillow, tokenizers,
# typer, rich) plus pytest. Time-boxed: a hung install or test fails the job instead of stalling it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TORCHFREE_VENV:-.venv-core}
LIMIT=${TORCHFREE_TIMEOUT_S:-900}
python3 -m venv "$VENV"
timeout "$LIMIT" "$VENV/bin/python" -m pip install -q --upgrade pip
timeout "$LIMIT" "$VENV/bin/python" -m pip install -q . pytest
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "error: torch is installed in $VENV; the core install must not pull it" >&2
    exit 1
fi
timeout "$LIMIT" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_torchfree.py
timeout "$LIMIT" "$VENV/bin/valley-rt" ask valley_rt/assets/clips/s4_00002.mp4 "How many shots are there?" --no-stream
