"""Float32 weights that lie on a GGUF grid, kept as their codes for small-batch linears.

The default model's layer linears are GGUF Q4_1 and its tied embedding / lm_head is Q8_0.
The loader dequantizes them once to float32 (`w = d * q + m`, exact in float32), and the
float32 model multiplies by those values. A decode step of a few rows is bound by the bytes of
weights it reads: 32 bits per weight in float32 against 4.5 (Q4_1) or 8.5 (Q8_0) as codes.
`pdserve/model/csrc/grid_linear.cpp` multiplies by the same values straight from the codes, in
float32, so the result is the float32 model's up to the order of its sums.

The codes are re-derived here from the float32 weights (not taken from the GGUF file), so any
source of weights works: per group of 32 along K, `m` is the group's minimum and `d` the fp16
rounding of (max - min) / 15 (Q8_0: of absmax / 127), both kept in float16 as GGUF keeps them.
They are used only where `d * q + m`
in float32 reproduces every weight bit for bit; a tensor with any other value (a safetensors
checkpoint, weights after an RL update, a tensor-parallel shard whose K is not a multiple of
32) has no grid and keeps the dense path. Nothing is approximated.

docs/architecture.md, "Grid linears".
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger("pdserve.grid")

GROUP = 32


@functools.cache
def grid_available() -> bool:
    """True where pdserve's CPU kernels build and carry a SIMD grid path: AVX-512, or AVX2 + FMA
    + F16C (session 8; AMD EPYC and other CPUs without AVX-512). Without either, the kernel's
    scalar loop is slower than a dense matmul, so nothing uses it."""
    from pdserve.model import cpu_kernels

    try:
        cpu_kernels.load()
    except RuntimeError as e:
        logger.warning("float32 grid linears off: %s", e)
        return False
    if not torch.ops.pdserve_cpu.grid_simd():
        logger.info("float32 grid linears off: the CPU has neither AVX-512 nor AVX2 + FMA + F16C")
        return False
    return True


@dataclass(frozen=True)
class Q4Grid:
    """Q4_1 codes: uint8 [N, K/2] (per group, low nibbles = elements 0..15, high = 16..31),
    scale d and minimum m, float16 [N, K/32] (as GGUF stores them)."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.d, self.m))


@dataclass(frozen=True)
class Q8Grid:
    """Q8_0 codes: int8 [N, K]; scale d float16 [N, K/32]."""

    codes: torch.Tensor
    d: torch.Tensor

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.d))


def _derive(w: torch.Tensor, q4: bool) -> tuple[torch.Tensor, ...] | None:
    """The codes of w in one pass (torch.ops.pdserve_cpu.grid_derive), or None: not float32 on
    CPU, K not a multiple of 32, or a weight the codes do not reproduce bit for bit. Q4_1: m is
    the group's minimum, d the fp16 rounding of (max - min) / 15, q = round((w - m) / d), and
    d * q + m must equal w with both operations rounded to float32 (numpy's dequantize in
    gguf.quants); m must be a float16 value, as GGUF stores it (d and m are kept in float16).
    Q8_0: d = fp16(absmax / 127), q = round(w / d), d * q == w."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.device.type != "cpu" or w.shape[1] % GROUP:
        return None
    codes, d, m, ok = torch.ops.pdserve_cpu.grid_derive(w.contiguous(), q4)
    return (codes, d, m) if ok else None


def q4_grid(w: torch.Tensor) -> Q4Grid | None:
    """The Q4_1 codes of w, or None unless they reproduce w exactly."""
    got = _derive(w, True)
    return Q4Grid(*got) if got else None


def q8_grid(w: torch.Tensor) -> Q8Grid | None:
    """The Q8_0 codes of w, or None unless they reproduce w exactly."""
    got = _derive(w, False)
    return Q8Grid(got[0], got[1]) if got else None


def grid_linear(x: torch.Tensor, grid: Q4Grid | Q8Grid) -> torch.Tensor:
    """x [M, K] float32 @ the grid's weight.T -> [M, N] float32 (torch.ops.pdserve_cpu)."""
    x = x.contiguous()
    if isinstance(grid, Q4Grid):
        return torch.ops.pdserve_cpu.grid_linear_q4(x, grid.codes, grid.d, grid.m)
    return torch.ops.pdserve_cpu.grid_linear_q8(x, grid.codes, grid.d)


def dense(grid: Q4Grid | Q8Grid) -> torch.Tensor:
    """The float32 weight the codes stand for (tests)."""
    if isinstance(grid, Q4Grid):
        c = grid.codes.reshape(grid.d.shape[0], grid.d.shape[1], 16)
        q = torch.cat([c & 0x0F, c >> 4], dim=2).float()
        return (grid.d.float()[..., None] * q + grid.m.float()[..., None]).reshape(grid.d.shape[0], -1)
    q = grid.codes.reshape(grid.d.shape[0], grid.d.shape[1], GROUP).float()
    return (grid.d.float()[..., None] * q).reshape(grid.codes.shape)
