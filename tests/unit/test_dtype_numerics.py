"""bf16 numerics that decide greedy answers: RMSNorm rounds as transformers does, and
`--dtype auto` picks bf16 only where the CPU computes it natively."""

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine import model_loading
from pdserve.model.llama import rms_norm


@pytest.mark.parametrize("shape", [(1, 576), (37, 576), (5, 9, 64)])
def test_rms_norm_bf16_is_bit_identical_to_transformers(shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 4).to(torch.bfloat16)
    ref = LlamaRMSNorm(shape[-1], eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_((1 + 0.2 * torch.randn(shape[-1], generator=g)).to(torch.bfloat16))
        expected = ref(x)
    got = rms_norm(x, ref.weight.detach(), 1e-5)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    # torch's fused form rounds once, after the weight: not what transformers computes
    fused = F.rms_norm(x, (shape[-1],), ref.weight.detach(), 1e-5)
    assert not torch.equal(fused, expected)


def test_rms_norm_fp32_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(7, 64)
    ref = LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        torch.testing.assert_close(rms_norm(x, ref.weight.detach(), 1e-6), ref(x))


@pytest.mark.parametrize(
    "amx,avx512bf16,expected",
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)],
)
def test_auto_dtype_follows_native_bf16(monkeypatch, amx, avx512bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512bf16, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert model_loading.resolve_dtype("auto") == expected
    assert model_loading.resolve_dtype("float32") == torch.float32
