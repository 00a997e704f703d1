"""Our forward equals transformers' on tiny random Llama / Qwen2 / Qwen3 checkpoints
(loaded from a HF safetensors directory), and the 4-bit decode path stays close."""

import pytest
import torch

from pdserve.engine.kv_pool import PageAllocator
from pdserve.engine.request import Req
from pdserve.engine.runner import ModelRunner
from pdserve.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.model.config import ModelConfig
from pdserve.model.llama import LlamaModel
from pdserve.model.loader import load_model_files

COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


def hf_model(kind, tmp_path, tie):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(**COMMON, tie_word_embeddings=tie)
        m = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**COMMON, tie_word_embeddings=tie)
        m = tf.Qwen2ForCausalLM(cfg)
    else:
        cfg = tf.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=tie)
        m = tf.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # make norms non-trivial
        for n, p in m.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    m.eval()
    m.save_pretrained(tmp_path)
    return m


@pytest.mark.parametrize("kind,tie", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)])
def test_greedy_matches_transformers(kind, tie, tmp_path):
    hf = hf_model(kind, tmp_path, tie)
    cfg, state = load_model_files(str(tmp_path))
    assert cfg.arch == kind and cfg.qk_norm == (kind == "qwen3") and cfg.qkv_bias == (kind == "qwen2")
    model = LlamaModel(cfg, torch.float32)
    model.load_weights(state)
    prompt = [5, 17, 33, 100, 2, 250, 7, 9, 11]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    s = Scheduler(PageAllocator(32, 4), max_running_requests=4, chunked_prefill_size=4, context_length=256, eos_ids=())
    runner = ModelRunner(model, 32, 4)
    s.add_request(Req("a", prompt, SamplingParams(max_new_tokens=10, temperature=0)))
    got = []
    while s.has_work():
        plan = s.schedule()
        got += [t for o in s.update(plan, runner.run(plan)) for t in o.new_ids]
    assert got == ref


def snap_to_q4_1_grid(w):
    """What a Q4_1 GGUF holds: per 32-weight group, d * q + m with q in 0..15."""
    n, k = w.shape
    g = w.view(n, k // 32, 32)
    lo, hi = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    d = (hi - lo) / 15
    return (torch.round((g - lo) / d) * d + lo).view(n, k)


def test_w4_decode_path_is_as_close_as_bf16_on_q4_weights():
    from pdserve.model.attention import ExtendSeq, ForwardBatch, TorchNativeAttention
    from pdserve.model.llama import random_state

    cfg = ModelConfig.tiny(hidden_size=64, intermediate_size=128)
    state = {
        k: snap_to_q4_1_grid(v) if v.dim() == 2 and "embed" not in k else v for k, v in random_state(cfg, 0).items()
    }
    ids, pos = torch.tensor([3, 9, 27, 81]), torch.arange(4)
    outs = []
    for dtype, q4 in ((torch.float32, 0), (torch.bfloat16, 0), (torch.bfloat16, 8)):
        m = LlamaModel(cfg, dtype, q4_max_tokens=q4)
        m.load_weights(state)
        assert (m.layers[0].q4 is not None) == bool(q4)
        kv = torch.zeros(4, cfg.num_layers, 2, 4, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
        batch = ForwardBatch(
            ids, pos, pos // 4, pos % 4, extends=[ExtendSeq(0, 4, 0, None, None)], logits_indices=torch.tensor([3])
        )
        outs.append(m.forward(batch, TorchNativeAttention(kv)))
    scale = outs[0].abs().max()
    err_bf16 = (outs[1] - outs[0]).abs().max() / scale
    err_q4 = (outs[2] - outs[0]).abs().max() / scale
    assert err_q4 < 3 * err_bf16 + 1e-3, (err_q4, err_bf16)
