"""`--quantization w8a8_int8`: int8 weights per output channel, int8 activations per row.

What users rely on: the product is close to the float one, a request's result does not
depend on what it is batched with (PD output equals mode null; the same prompt answers the
same alone or in a batch), weight updates rebuild the int8 copies, and bad flag values are
clear errors."""

import pytest
import torch

from pdserve.config import ServerArgs
from pdserve.setting_checks import int8_matmul_missing
from pdserve.model.config import ModelConfig
from pdserve.model.linears import int8_linear, quantize_int8
from pdserve.model.llama import LlamaModel, random_state
from pdserve.model.weight_update import apply_named_weights


def test_int8_product_is_close_to_the_float_one():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) / 8
    x = torch.randn(40, 64, generator=g)
    q8 = quantize_int8(w)
    assert q8[0].dtype == torch.int8 and q8[0].shape == (64, 96) and q8[1].shape == (96,)
    ref = x @ w.T
    err = (int8_linear(x, q8) - ref).abs().max() / ref.abs().max()
    assert err < 0.03
    # and the error is quantization error, not noise: a zero row stays exactly zero
    assert int8_linear(torch.zeros(3, 64), q8).abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_the_rest_of_the_batch(dtype):
    """Bitwise: each row has its own scale and int32 sums are exact, so row i of a batch of
    any size (padded row counts included) equals that row computed alone."""
    g = torch.Generator().manual_seed(1)
    q8 = quantize_int8(torch.randn(80, 48, generator=g))
    for m in (1, 5, 33, 57, 130):
        x = (torch.randn(m, 48, generator=g) * torch.logspace(-2, 2, m)[:, None]).to(dtype)
        batch = int8_linear(x, q8)
        assert batch.dtype == dtype and batch.shape == (m, 80)
        for i in (0, m // 2, m - 1):
            assert torch.equal(batch[i : i + 1], int8_linear(x[i : i + 1], q8))


def _tiny(int8: bool, seed: int = 0) -> LlamaModel:
    cfg = ModelConfig.tiny(vocab_size=300, eos_token_ids=())
    model = LlamaModel(cfg, torch.float32, int8_linears=int8)
    model.load_weights(random_state(cfg, seed))
    return model


def test_model_keeps_plain_weights_and_uses_int8_copies():
    model = _tiny(True)
    layer = model.layers[0]
    assert set(layer.q8) == {"qkv", "o", "gate_up", "down"}
    assert all(p is None for p in layer.packed.values())  # no second float copy
    assert layer.qkv.dtype == torch.float32  # the plain weights stay (weight sync reads them)
    assert model.prebuild_linear_shapes(64, 8) > 0


def test_a_weight_update_rebuilds_the_int8_copies():
    """After an update the int8 copies are those of the new weights, exactly as if the
    updated checkpoint had been loaded."""
    model, target = _tiny(True, seed=0), _tiny(True, seed=1)
    state = random_state(model.config, seed=1)
    apply_named_weights(model, {n: t for n, t in state.items() if n.startswith("model.layers.1.")})
    for n in ("qkv", "o", "gate_up", "down"):
        assert torch.equal(model.layers[1].q8[n][0], target.layers[1].q8[n][0])
        assert torch.equal(model.layers[1].q8[n][1], target.layers[1].q8[n][1])
    assert not torch.equal(model.layers[0].q8["qkv"][0], target.layers[0].q8["qkv"][0])


def test_bad_quantization_names_the_flag():
    with pytest.raises(ValueError, match="--quantization: must be one of"):
        ServerArgs(quantization="fp3")


def test_int8_is_accepted_only_where_its_matmul_is_fast():
    """On AVX-512 CPUs w8a8_int8 is a setting like any other; on AVX2-only CPUs torch's int8
    matmul is a slow loop, and the flag is refused with the reason instead of serving 30x slower."""
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert int8_matmul_missing() is None
        assert ServerArgs(quantization="w8a8_int8").quantization == "w8a8_int8"
    else:
        with pytest.raises(ValueError, match="--quantization: int8 linears need an AVX-512 CPU"):
            ServerArgs(quantization="w8a8_int8")
