"""Build the model and size the KV pool from ServerArgs."""

from __future__ import annotations

import logging
import os
import time

import psutil
import torch

from pdserve.config import ServerArgs
from pdserve.enums import Quantization
from pdserve.engine.runner import kv_bytes_per_token
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaModel
from pdserve.model.loader import load_model_files
from pdserve.model.tp import TPShard, shard_state
from pdserve.model.paths import resolve_model_path

logger = logging.getLogger(__name__)

DEFAULT_CPU_MEM_FRACTION = 0.1


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16: bf16 matmuls run in hardware. Without them oneDNN emulates
    bf16 and a 64-row bf16 linear measured 3.5x slower than fp32 (docs/architecture.md, "dtype")."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def auto_dtype() -> torch.dtype:
    """`--dtype auto`: bfloat16 where the CPU computes it natively (faster than fp32 there,
    docs/benchmarks.md), else float32 (as vLLM's CPU backend falls back)."""
    if torch.backends.mkldnn.is_available() and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return auto_dtype()
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_model(args: ServerArgs, tp_rank: int = 0) -> LlamaModel:
    """The model, or tensor-parallel rank `tp_rank`'s shard of it when --tp-size > 1."""
    path = resolve_model_path(args.model_path)
    config, state = load_model_files(path)
    shard = TPShard.of(config, tp_rank, args.tp_size)
    model = LlamaModel(
        shard.local_config(config),
        resolve_dtype(args.dtype),
        args.w4_decode_max_tokens,
        computes_logits=tp_rank == 0,
        int8_linears=args.quantization == Quantization.W8A8_INT8,
    )
    model.full_config = config
    model.load_weights(shard_state(state, config, shard))
    del state
    return model


def prebuild_shapes(model: LlamaModel, args: ServerArgs) -> None:
    """Build oneDNN's kernels for every linear row count a step can have, before serving
    (LlamaModel.prebuild_linear_shapes: RSS stays flat while serving). After the KV pool is
    sized, so a server that cannot start says so without waiting for this."""
    if model.grid:  # logged here, after the KV pool is sized: a server that cannot start says only why
        logger.info(
            "grid linears (float32 from the GGUF codes, exact): %d of %d layer linears, lm_head %s",
            sum(len(layer.q4 or {}) for layer in model.layers),
            4 * len(model.layers),
            type(model.lm_head_grid).__name__ if model.lm_head_grid is not None else "dense",
        )
    t0 = time.perf_counter()
    # a step holds up to max_running decodes plus one prefill chunk (engine/scheduler.py)
    built = model.prebuild_linear_shapes(
        args.chunked_prefill_size + args.max_running_requests, args.max_running_requests
    )
    if built:
        logger.info(
            "Built %d linear kernel shapes in %.2f s (RSS stays flat while serving)", built, time.perf_counter() - t0
        )


def num_kv_pages(args: ServerArgs, cfg: ModelConfig, dtype: torch.dtype, weight_bytes: int) -> int:
    if args.max_total_tokens is not None:
        tokens = args.max_total_tokens
    else:
        frac = args.mem_fraction_static or DEFAULT_CPU_MEM_FRACTION
        budget = frac * psutil.virtual_memory().total - weight_bytes
        if budget <= 0:
            raise ValueError(
                f"--mem-fraction-static {frac} leaves no memory for the KV pool "
                f"(weights take {weight_bytes / 2**20:.0f} MiB)"
            )
        tokens = int(budget // kv_bytes_per_token(cfg, dtype))
    return max(1, tokens // args.page_size)


def set_threads(args: ServerArgs) -> None:
    n = args.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
