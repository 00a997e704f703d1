"""The layers' linear products (issue #12): oneDNN's prepacked float weights, `--quantization
w8a8_int8`'s int8 weights and activations, the 4-bit / grid copies small batches multiply by, and
the row-count padding that keeps oneDNN's primitive caches bounded. `linear()` picks one per call;
LlamaModel (llama.py) builds the copies and calls it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.model.fused_ops import CpuFusedOps, Int8Sums
from pdserve.model.grid import Q4Grid, grid_linear

INT4_GROUP = 32
# float32 grid linears (pdserve/model/grid.py) beat oneDNN's packed float32 layer linears up to
# 8 rows, as they do the lm_head (benchmarks/bench_grid_linear.py, 2026-12-01 23:54 UTC: a layer's
# four linears 1.14x at 8 rows, 0.75x at 16); above, the dense path runs
GRID_LAYER_MAX_ROWS = 8


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit, groups of 32 along K (the Q4_1 layout: for a Q4_1 GGUF this
    reproduces its grid, up to bf16 rounding of scale and zero). Returns torch's
    CPU int4 packed weight and scales_and_zeros [K/group, N, 2]."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zero = lo + 8.0 * scale  # the kernel dequantizes (q - 8) * scale + zero
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, sz


PACK_BATCH = 512  # the batch size oneDNN's weight layout is chosen for (measured best across 1..512)


def pack_weight(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's pre-reordered ("prepacked") copy of a linear weight, or None where that
    path does not exist (no mkldnn, not on CPU). Plain `F.linear` reorders the weight on
    every call: at 64 rows that made a bf16 layer 3x slower than with the packed weight
    (docs/architecture.md, "Linear layers")."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH)
        x = torch.ones(1, w.shape[1], dtype=w.dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    # On CPUs without native bf16 (AVX2-only, e.g. AMD Zen 3) torch 2.13 reorders a bf16 weight
    # without error but the product comes back [1, 0]: use the plain product there.
    wf = w.float()
    if y.shape != (1, w.shape[0]) or ((y[0].float() - wf.sum(1)).abs() > 2e-2 * wf.abs().sum(1) + 1e-3).any():
        return None
    return packed


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`--quantization w8a8_int8` weights: symmetric int8 per output channel. Returns the
    transposed int8 weight [K, N] (torch._int_mm's layout) and the float32 scales [N]."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.t().contiguous(), scale


def int8_linear(
    x: torch.Tensor,
    q8: tuple[torch.Tensor, torch.Tensor],
    pre: tuple[torch.Tensor, torch.Tensor] | None = None,
    fo: CpuFusedOps | None = None,
    raw: bool = False,
) -> torch.Tensor | Int8Sums:
    """x [M, K] @ an int8 weight (quantize_int8): each row of x is quantized to int8 with its own
    scale, multiplied in int8 with int32 sums (oneDNN, VNNI where the CPU has it), then scaled
    back. Rows never share a scale and integer sums are exact, so a row's result does not depend
    on the other rows of the batch (PD equals mode null; a request's output does not depend on
    what it was batched with). The row count is padded as for packed_linear (bounded shapes).
    `pre`: x's int8 rows and scales, already computed by a fused kernel (fused_ops, quant=True);
    `fo`: the fused ops, which also scale the int32 sums back (same bits, one pass).
    `raw`: return the int32 sums and scales (Int8Sums) for a fused op that dequantizes them."""
    wq, w_scale = q8
    m = x.shape[0]
    if pre is not None:
        xq, x_scale = pre
    else:
        xf = x.float()
        x_scale = (xf.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        xq = torch.round(xf / x_scale).to(torch.int8)
    mp = padded_rows(m)
    if mp != m:
        xq = _pad_rows(xq, mp)
    acc = torch._int_mm(xq, wq)
    if raw:
        return Int8Sums(acc, x_scale, w_scale, m)
    if fo is not None:
        return fo.int8_dequant(acc, x_scale, w_scale, m, x.dtype)
    if mp != m:
        acc = acc[:m]
    return (acc.float() * x_scale * w_scale).to(x.dtype)


EXACT_ROWS = 32  # row counts up to this reach oneDNN as they are (decode batches)
LOGIT_EXACT_ROWS = 8  # lm_head: memory-bound up to here; above, 4 steps per doubling
LOGIT_STEPS = 4


def padded_rows(m: int, exact: int = EXACT_ROWS, steps: int = 8) -> int:
    """The row count a prepacked linear runs at for `m` rows of input.

    oneDNN (through ideep) builds and caches a primitive for every input shape it sees, about
    0.5 MiB per weight shape and row count (shared by all weights of one shape), in caches of
    1024 entries; the memory of evicted ones is not given back to the system. A prefill server
    sees a new row count with almost every new prompt length, so its RSS grew by ~1-2 MiB per
    new length, past the caches' capacity and without bound (issue #10, docs/benchmarks.md
    "Soak with faults"). Above `exact` the count is rounded up to one of `steps` sizes per
    power of two (8: at most 12.5 % padding rows), so a server meets a fixed, small set of row
    counts, which warm-up builds before the first request (`LlamaModel.prebuild_linear_shapes`)
    and RSS stays flat afterwards."""
    if m <= exact:
        return m
    step = 1 << max(0, (m - 1).bit_length() - steps.bit_length())
    return -(-m // step) * step


def row_counts(max_rows: int, exact: int = EXACT_ROWS, steps: int = 8) -> list[int]:
    """Every row count padded_rows() can return for 1..max_rows rows."""
    return sorted({padded_rows(m, exact, steps) for m in range(1, max_rows + 1)})


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with zero rows appended up to `rows` (only the new rows are written twice)."""
    out = x.new_empty(rows, x.shape[1])
    out[: x.shape[0]] = x
    out[x.shape[0] :].zero_()
    return out


def packed_linear(x: torch.Tensor, packed: torch.Tensor, exact: int = EXACT_ROWS, steps: int = 8) -> torch.Tensor:
    """x [M, K] @ the prepacked weight, run at padded_rows(M) rows (zero rows appended)."""
    m = x.shape[0]
    mp = padded_rows(m, exact, steps)
    if mp != m:
        x = _pad_rows(x, mp)
    out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return out[:m] if mp != m else out


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    q4: tuple | Q4Grid | None,
    small: bool,
    packed: torch.Tensor | None = None,
    q8: tuple | None = None,
    pre: tuple | None = None,
    fo: CpuFusedOps | None = None,
    raw: bool = False,
) -> torch.Tensor | Int8Sums:
    # Small batches are memory-bound: 4-bit weights read 4x fewer bytes per token
    # (benchmarks/bench_engine.py); large batches are compute-bound and stay on bf16/AMX.
    # --quantization w8a8_int8 with 4-bit copies: small steps take the 4-bit copies (fewer bytes
    # than int8, and no activation quantization), the rest int8.
    if small and q4 is not None:
        if isinstance(q4, Q4Grid):
            return grid_linear(x, q4)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4[0], INT4_GROUP, q4[1])
    if q8 is not None:
        return int8_linear(x, q8, pre, fo, raw)
    if packed is not None:
        return packed_linear(x, packed)
    return F.linear(x, w)
