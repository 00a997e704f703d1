"""Weights by Hugging Face name (model/weight_update.py) and memory release
(engine/memory_release.py), in one process on a tiny model (issue #15)."""

import pytest
import torch

from pdserve.engine.shm_segment import allocate_kv_buffer, free_kv_buffer, new_shm_name
from pdserve.engine.memdebug import rss_bytes
from pdserve.engine.memory_release import MemoryReleaser, MemoryTag, parse_tags
from pdserve.model.attention import ForwardBatch
from pdserve.model.attention_backends import create_attention_backend
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaModel, random_state
from pdserve.model.weight_update import apply_named_weights, hf_views, parse_dtype, weight_rows

CFG = ModelConfig.tiny(vocab_size=300, eos_token_ids=())


def model_from(state) -> LlamaModel:
    m = LlamaModel(CFG, torch.float32)
    m.load_weights(state)
    return m


def logits(model: LlamaModel) -> torch.Tensor:
    """A 6-token prefill's logits (paged attention over a fresh pool)."""
    from pdserve.engine.runner import kv_pool_shape

    kv = torch.zeros(kv_pool_shape(CFG, 4, 4))
    attn = create_attention_backend("torch_native", kv)
    fb = ForwardBatch(
        input_ids=torch.tensor([5, 9, 11, 3, 7, 8]),
        positions=torch.arange(6),
        write_pages=torch.tensor([0, 0, 0, 0, 1, 1]),
        write_offs=torch.tensor([0, 1, 2, 3, 0, 1]),
        num_decode=0,
        extends=[],
        logits_indices=None,
    )
    from pdserve.model.attention import ExtendSeq

    fb.extends = [ExtendSeq(0, 6, 0, None, None)]
    return model.forward(fb, attn)


def test_views_cover_every_checkpoint_name_and_alias_the_model():
    state = random_state(CFG)
    model = model_from(state)
    views = hf_views(model)
    assert set(state) <= set(views)
    for name, t in state.items():
        torch.testing.assert_close(views[name], t, rtol=0, atol=0)


def test_update_equals_loading_the_updated_checkpoint():
    state = random_state(CFG)
    model = model_from(state)
    g = torch.Generator().manual_seed(1)
    changes = {
        n: state[n] + 0.1 * torch.randn(state[n].shape, generator=g)
        for n in (
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.norm.weight",
            "model.layers.1.self_attn.o_proj.weight",
        )
    }
    before = logits(model)
    assert apply_named_weights(model, {n: t.to(torch.bfloat16).float() for n, t in changes.items()}) == 2
    expected = model_from({**state, **{n: t.to(torch.bfloat16).float() for n, t in changes.items()}})
    out = logits(model)
    torch.testing.assert_close(out, logits(expected), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, before)
    rows = weight_rows(model, "model.layers.0.self_attn.k_proj.weight", 2)
    assert torch.tensor(rows).shape == (2, 64)


@pytest.mark.parametrize(
    "bad",
    [
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)},  # wrong shape
        {"model.layers.9.mlp.up_proj.weight": torch.zeros(128, 64)},  # no such layer
        {"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.int64)},  # not a float
    ],
)
def test_a_bad_update_changes_nothing(bad):
    state = random_state(CFG)
    model = model_from(state)
    before = logits(model)
    good = {"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 128)}
    with pytest.raises(ValueError):
        apply_named_weights(model, {**good, **bad})
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_dtypes_and_tags_are_checked():
    assert parse_dtype("torch.bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="int64"):
        parse_dtype("int64")
    assert parse_tags(None) == [MemoryTag.WEIGHTS, MemoryTag.KV_CACHE]
    with pytest.raises(ValueError, match="unknown memory tag"):
        parse_tags(["gpu"])


@pytest.mark.parametrize("shared", [False, True])
def test_release_gives_memory_back_and_resume_restores_it(shared, tmp_path):
    n = 64 << 20
    weights = [torch.randn(n // 4)]
    name = new_shm_name() if shared else None
    kv = allocate_kv_buffer((n // 4,), torch.float32, name)
    kv.fill_(1.5)
    copy = weights[0].clone()
    rel = MemoryReleaser(lambda: weights, [kv], spool_dir=str(tmp_path))
    try:
        r0 = rss_bytes()
        info = rel.release([MemoryTag.WEIGHTS, MemoryTag.KV_CACHE])
        assert info["bytes_released"] >= 2 * n - 4 * 4096
        assert r0 - rss_bytes() >= 1.25 * n  # (RSS counters lag a little for shared memory)
        assert int((kv != 0).sum()) * 4 <= 2 * 4096  # the pool's contents are gone (but its partial end pages)
        rel.resume([MemoryTag.WEIGHTS, MemoryTag.KV_CACHE])
        torch.testing.assert_close(weights[0], copy, rtol=0, atol=0)
        assert not list(tmp_path.iterdir())  # the spool file is gone
    finally:
        rel.close()
        if name:
            free_kv_buffer(name)
