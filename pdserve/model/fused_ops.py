"""Fused element-wise ops of the Llama forward on the CPU (pdserve/model/csrc/elementwise.cpp).

`LlamaModel.forward` runs these where `fused_ops_for()` hands it an instance (CPU tensors, float32
or bfloat16, the kernels built); everywhere else (GPUs, other dtypes, `--attention-backend
torch_native`) it keeps its torch form, the portable reference. Each op rounds where that torch
form rounds (docs/architecture.md, "CPU kernels"), so the outputs are the same bits:

- `add_rms_norm` / `rms_norm`: bitwise `h += a; rms_norm(h, w, eps)` in float32 and bfloat16.
  The sum of squares follows torch's CPU sum order, whose vector width is measured once here
  (`_sum_lanes`): torch runs its reductions 8 lanes wide on AVX-512 machines too.
- `rope_qk_`: bitwise `apply_rope` on q and k, in place in the qkv output, one pass.
- with `quant=True` (--quantization w8a8_int8) `add_rms_norm`, `rms_norm` and `silu_mul` also
  return their output's int8 rows and scales, bitwise what `int8_linear` would compute.
- `int8_dequant`: bitwise int8_linear's `(acc.float() * x_scale * w_scale).to(dtype)`; where the
  next op is a fused one, it takes the int32 sums (`Int8Sums`) instead and dequantizes on the
  fly with the same rounding (`add_rms_norm_i32`, `silu_mul_i32`), so the linear's output is
  never written out and read back; `int8_quant` quantizes the attention output for o_proj.
- `silu_mul`: bitwise `F.silu(g) * u` where the gate width is a multiple of 32 (torch's vector
  loop; SLEEF's exp on both sides); at most 1 ulp of the float32 SiLU off in a ragged tail on
  AVX-512, where torch's scalar loop uses libm's exp (on AVX2-only CPUs the kernel splits rows
  as torch does there: bitwise at every width). bfloat16 rounds the SiLU before the product.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.model import cpu_kernels

logger = logging.getLogger("pdserve.fused_ops")

DTYPES = (torch.float32, torch.bfloat16)


def _sum_lanes(ops) -> int:
    """The vector width of torch's float32 CPU sum on this machine/build: the one for which the
    kernel's RMSNorm equals F.rms_norm bitwise (8 with AVX2 or AVX-512 today)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g) * 3
    w = torch.ones(1000)
    ref = F.rms_norm(x, (1000,), w, 1e-5)
    for lanes in (8, 16, 4, 1):
        out = torch.empty_like(x)
        ops.rms_norm(x, None, w, 1e-5, lanes, out)
        if torch.equal(out, ref):
            return lanes
    logger.warning("fused RMSNorm: no vector width reproduces torch's sum here; outputs may differ by 1 ulp")
    return 8


def _q8_outputs(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(out.shape, dtype=torch.int8), torch.empty(out.shape[0], 1, dtype=torch.float32)


@dataclass
class Int8Sums:
    """An int8 linear's output before it is scaled back (--quantization w8a8_int8): the int32
    sums `acc` [>= rows, N] (padding rows below `rows`), each row's activation scale and each
    column's weight scale. The fused ops that consume it dequantize on the fly."""

    acc: torch.Tensor
    x_scale: torch.Tensor
    w_scale: torch.Tensor
    rows: int

    def select(self, idx: torch.Tensor) -> Int8Sums:
        """The rows `idx` (e.g. the sampled ones)."""
        return Int8Sums(self.acc[idx], self.x_scale[idx], self.w_scale, int(idx.numel()))

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        """`(acc.float() * x_scale * w_scale).to(dtype)`, int8_linear's torch form."""
        return (self.acc[: self.rows].float() * self.x_scale * self.w_scale).to(dtype)


class CpuFusedOps:
    """The fused ops, bound to torch.ops.pdserve_cpu (builds/loads the kernels; RuntimeError
    when they cannot be built)."""

    def __init__(self) -> None:
        cpu_kernels.load()
        self._ops = torch.ops.pdserve_cpu
        self.lanes = _sum_lanes(self._ops)

    # With quant=True the ops below return (out, (q, scale)): out's rows quantized to int8 as
    # linears.int8_linear quantizes its input (--quantization w8a8_int8), in the same pass.

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float, quant: bool = False):
        """rms_norm(x, w, eps) of llama.py, as a new tensor."""
        return self.add_rms_norm(x, None, w, eps, quant)

    def add_rms_norm(self, h: torch.Tensor, a: torch.Tensor | None, w: torch.Tensor, eps: float, quant: bool = False):
        """`h += a` (in place, rounded to h's dtype), then rms_norm(h, w, eps): one pass."""
        out = torch.empty_like(h)
        q = _q8_outputs(out) if quant else (None, None)
        self._ops.rms_norm(h, a, w, eps, self.lanes, out, *q)
        return (out, q) if quant else out

    def silu_mul(self, gu: torch.Tensor, quant: bool = False):
        """silu(gu[:, :I]) * gu[:, I:] for gu [T, 2I]."""
        out = gu.new_empty(gu.shape[0], gu.shape[1] // 2)
        q = _q8_outputs(out) if quant else (None, None)
        self._ops.silu_mul(gu, out, *q)
        return (out, q) if quant else out

    def add_rms_norm_i32(self, h: torch.Tensor, sums: Int8Sums, w: torch.Tensor, eps: float, quant: bool = False):
        """add_rms_norm(h, sums.dequant(), w, eps) without writing the dequantized residual: an
        int8 linear's int32 sums are scaled back on the fly, rounded as int8_dequant rounds."""
        out = torch.empty_like(h)
        q = _q8_outputs(out) if quant else (None, None)
        self._ops.rms_norm_i32(h, sums.acc, sums.x_scale, sums.w_scale, w, eps, self.lanes, out, *q)
        return (out, q) if quant else out

    def silu_mul_i32(self, sums: Int8Sums, dtype: torch.dtype, quant: bool = False):
        """silu_mul(sums.dequant()) for an int8 gate_up linear, without writing its output."""
        out = torch.empty(sums.rows, sums.acc.shape[1] // 2, dtype=dtype)
        q = _q8_outputs(out) if quant else (None, None)
        self._ops.silu_mul_i32(sums.acc, sums.x_scale, sums.w_scale, out, *q)
        return (out, q) if quant else out

    def int8_quant(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x's int8 rows and scales, as linears.int8_linear quantizes its input, one pass."""
        q = _q8_outputs(x)
        self._ops.int8_quant(x, *q)
        return q

    def int8_dequant(self, acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, rows: int, dtype):
        """(acc[:rows].float() * x_scale * w_scale).to(dtype), int8_linear's last step, one pass."""
        out = torch.empty(rows, acc.shape[1], dtype=dtype)
        self._ops.int8_dequant(acc, x_scale, w_scale, out)
        return out

    def rope_qk_(
        self, qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
    ) -> None:
        """apply_rope on the first `heads` heads of each row of qkv [T, >= heads * D] (q's then
        k's heads), in place; cos/sin [max_pos, D] are the model's tables."""
        self._ops.rope_qk(qkv, positions, cos, sin, heads)


_instance: CpuFusedOps | None = None
_failed: str | None = None


def fused_ops_for(device: torch.device, dtype: torch.dtype) -> CpuFusedOps | None:
    """The fused ops for tensors of this device and dtype, or None where the torch form runs:
    not the CPU, not float32/bfloat16, or the kernels do not build (logged once)."""
    global _instance, _failed
    if device.type != "cpu" or dtype not in DTYPES or _failed is not None:
        return None
    if _instance is None:
        try:
            _instance = CpuFusedOps()
        except RuntimeError as e:
            _failed = str(e)
            logger.warning("fused CPU element-wise ops unavailable (%s); using torch's", e)
            return None
    return _instance
