"""apply_rope computes transformers' `x * cos + rotate_half(x) * sin` without building
rotate_half(x), and must give the very same bits (greedy output is compared token for token
with transformers)."""

import pytest
import torch

from pdserve.model.llama import apply_rope


def rotate_half(x: torch.Tensor) -> torch.Tensor:  # transformers' form
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_bitwise_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(37, (9 + 3 + 3) * 64, generator=g) * 3).to(dtype)
    pos = torch.randint(0, 8192, (37,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    ang = pos[:, None].float() * inv[None]
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    qk = qkv[:, : 12 * 64].view(37, 12, 64)  # q and k heads side by side, a strided view as in forward
    got = apply_rope(qk, cos, sin)
    assert torch.equal(got, qk * cos + rotate_half(qk) * sin)
    assert torch.equal(qk, qkv[:, : 12 * 64].view(37, 12, 64))  # the input is left alone
