"""Checks of settings that need facts owned by upper layers: whether a model path is a
Hugging Face Hub name, which tool-call parsers exist, whether a transfer backend's
optional package is installed. They live at the bottom of the import graph so that
`config.py` (ServerArgs) validates a setting without importing the server or disagg layers."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re

from pdserve.enums import TransferBackend

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# --tool-call-parser: the names pdserve/server/tools/registry.py maps to parsers (a unit test
# keeps the two equal)
TOOL_CALL_PARSERS = ("hermes", "qwen", "qwen25", "qwen3")


def hub_name_hint(path: str) -> str | None:
    """The fix for a Hugging Face Hub name passed as a path (pdserve loads local files only)."""
    if os.path.exists(path) or not HUB_NAME.fullmatch(path) or path.endswith(".gguf"):
        return None
    local = "./" + path.split("/")[-1]
    return (
        f"--model-path {path!r} is no local path; it looks like a Hugging Face Hub name, but pdserve "
        f"loads local files only (it downloads nothing): run `huggingface-cli download {path} --local-dir {local}` and pass "
        f"--model-path {local}, or pass a .gguf file"
    )


def missing_package(backend: TransferBackend) -> str | None:
    """Why an optional transfer backend cannot load here (what to install), or None."""
    if backend == TransferBackend.NIXL:
        if importlib.util.find_spec("nixl") is None:
            return "the nixl backend needs NIXL: pip install 'pdserve[nixl]' (after torch)"
    elif backend == TransferBackend.MOONCAKE:
        if importlib.util.find_spec("mooncake") is None:
            return (
                "the mooncake backend needs Mooncake's transfer engine: pip install 'pdserve[mooncake]' "
                "(and apt-get install libibverbs1)"
            )
        try:
            importlib.import_module("mooncake.engine")
        except ImportError as e:
            hint = "apt-get install libibverbs1" if "ibverbs" in str(e) else "reinstall 'pdserve[mooncake]'"
            return f"Mooncake's transfer engine does not load ({e}): {hint}"
    elif backend == TransferBackend.NCCL:
        import torch

        if not torch.cuda.is_available():
            return "the nccl backend needs CUDA GPUs (torch.cuda.is_available() is False here); use gloo on CPU"
    return None


def int8_matmul_missing() -> str | None:
    """Why `--quantization w8a8_int8` would be slow on this CPU, or None. Its linears run
    torch._int_mm, which reaches oneDNN's int8 kernels only with AVX-512 (VNNI where present);
    on AVX2-only CPUs (AMD Zen 3, measured) it falls back to a loop 30-50x slower than the
    float32 product (benchmarks/bench_int8_linear.py; docs/benchmarks.md, "Session 8")."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return None
    return (
        f"int8 linears need an AVX-512 CPU (this one: {cap}); here torch's int8 matmul is 30-50x slower "
        "than the float32 product, so pdserve refuses it: leave --quantization unset"
    )
