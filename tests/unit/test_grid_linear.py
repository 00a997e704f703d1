"""Grid linears (pdserve/model/grid.py, csrc/grid_linear.cpp): float32 weights that lie on a
GGUF Q4_1 / Q8_0 grid, multiplied from their codes. The codes must reproduce the weights bit for
bit, the product must be the dense float32 product up to the order of the sums, and a row's
result must not depend on the other rows of the batch."""

import pytest
import torch
import torch.nn.functional as F

from pdserve.model import cpu_kernels
from pdserve.model.grid import dense, grid_available, grid_linear, q4_grid, q8_grid


def cpu_kernels_build() -> bool:
    try:
        cpu_kernels.load()
    except RuntimeError:
        return False
    return True


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


needs_grid = pytest.mark.skipif(
    not grid_available(), reason="pdserve's CPU kernels or a SIMD grid path (AVX-512, AVX2+FMA+F16C) unavailable"
)


def q4_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """GGUF Q4_1 values: fp16 scale and minimum per group of 32, codes 0..15 (0 and 15 present)."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(n, k // 32, 1, generator=g) * 0.08).half().float()
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 3], q[..., 20] = 0, 15
    return (d * q + m).reshape(n, k)


def q8_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
    q[..., 5] = 127
    return (d * q).reshape(n, k)


@needs_grid
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_codes_reproduce_the_weights_bit_for_bit(kind):
    w = q4_weight(37, 96) if kind == "q4" else q8_weight(37, 96)
    grid = q4_grid(w) if kind == "q4" else q8_grid(w)
    assert grid is not None
    assert torch.equal(dense(grid), w)
    # a Q4 grid is ~6x smaller than the float32 weight, Q8 ~3.8x
    assert grid.num_bytes() < w.numel() * 4 / (5 if kind == "q4" else 3.5)


@needs_grid
def test_weights_off_the_grid_have_none():
    w = torch.randn(64, 64)
    assert q4_grid(w) is None and q8_grid(w) is None
    w = q4_weight(64, 64)
    w[7, 9] = torch.nextafter(w[7, 9], torch.tensor(1.0))  # one weight one ulp off
    assert q4_grid(w) is None
    assert q4_grid(q4_weight(8, 64)[:, :40].contiguous()) is None  # K not a multiple of 32
    assert q4_grid(q4_weight(8, 64).bfloat16()) is None  # float32 only
    # a group whose minimum is no float16 value (GGUF stores m in float16; so does the grid)
    w = q4_weight(8, 64)
    w[2, 32:64] += 2.0**-30
    assert q4_grid(w) is None


@needs_grid
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_scales_are_float16_as_gguf_stores_them(kind):
    w = q4_weight(16, 128) if kind == "q4" else q8_weight(16, 128)
    grid = q4_grid(w) if kind == "q4" else q8_grid(w)
    assert grid.d.dtype == torch.float16 and grid.d.shape == (16, 4)
    if kind == "q4":
        assert grid.m.dtype == torch.float16 and grid.m.shape == (16, 4)


@needs_grid
@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("n", [1, 4, 37, 256])
def test_product_equals_the_dense_one_and_rows_are_independent(kind, n):
    k = 160
    w = q4_weight(n, k, seed=n) if kind == "q4" else q8_weight(n, k, seed=n)
    grid = q4_grid(w) if kind == "q4" else q8_grid(w)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(1))
    y = grid_linear(x, grid)
    ref = F.linear(x.double(), w.double()).float()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for m in range(1, 10):  # 1..9 rows: every row tile (4, 3, 2, 1) and their mixes
        assert torch.equal(grid_linear(x[:m].clone(), grid), y[:m])
    assert torch.equal(grid_linear(x[5:6].clone(), grid), y[5:6])


@needs_grid
@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_the_kernel_multiplies_by_the_dequantized_weights_bit_for_bit(kind):
    """x = the identity: every output is one weight times 1 plus zeros, so the product is the
    kernel's rebuilt weights themselves (element order, nibble order, the roundings of d * q + m)
    and must equal w bit for bit, through every row tile (4, 2, 1 rows) and the last outputs."""
    n, k = 39, 128
    w = q4_weight(n, k, seed=3) if kind == "q4" else q8_weight(n, k, seed=3)
    grid = q4_grid(w) if kind == "q4" else q8_grid(w)
    eye = torch.eye(k)
    assert torch.equal(grid_linear(eye, grid), w.T)
    for rows in (1, 2, 3, 5):
        assert torch.equal(grid_linear(eye[:rows].clone(), grid), w.T[:rows])


@pytest.mark.skipif(not cpu_kernels_build(), reason="pdserve's CPU kernels do not build here")
def test_grid_is_on_wherever_the_cpu_has_a_simd_path():
    """grid_simd() is what turns the grid linears on (grid_available): true on AVX-512 and on
    AVX2 + FMA + F16C CPUs (the kernels compile with -march=native). Until session 8 it was
    AVX-512 only, and AVX2 machines silently fell back to the dense path."""
    flags = cpu_flags()
    simd = {"avx512f", "avx512bw"} <= flags or {"avx2", "fma", "f16c"} <= flags
    assert torch.ops.pdserve_cpu.grid_simd() == simd
    assert grid_available() == simd


@needs_grid
def test_bad_inputs_are_refused():
    grid = q4_grid(q4_weight(8, 64))
    with pytest.raises(RuntimeError, match="columns"):
        grid_linear(torch.randn(2, 32), grid)
    with pytest.raises(RuntimeError, match="float32"):
        grid_linear(torch.randn(2, 64).bfloat16(), grid)
    assert grid_linear(torch.randn(0, 64), grid).shape == (0, 8)


@needs_grid
def test_the_default_model_is_on_its_grid():
    """The default GGUF: every layer linear is Q4_1, the tied embedding Q8_0; the model uses
    them for steps of up to --w4-decode-max-tokens tokens, and the logits equal the dense ones."""
    from pdserve.config import ServerArgs
    from pdserve.engine.model_loading import load_model

    model = load_model(ServerArgs(dtype="float32"))
    assert model.grid and model.q4_max_tokens == 8
    assert all(set(layer.q4) == {"qkv", "o", "gate_up", "down"} for layer in model.layers)
    assert model.lm_head_grid is not None
    h = torch.randn(3, model.lm_head.shape[1])
    torch.testing.assert_close(grid_linear(h, model.lm_head_grid), F.linear(h, model.lm_head), rtol=1e-4, atol=1e-4)
    # weights moved off the grid (an RL update) fall back to the dense path, layer by layer
    layer = model.layers[0]
    layer.o.add_(1e-3 * torch.randn_like(layer.o))
    model.derive_layer(0)
    assert "o" not in model.layers[0].q4 and "qkv" in model.layers[0].q4
