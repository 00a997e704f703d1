"""Shared by the weight-sync tests (server endpoints and the RL strategy): the transformers
reference on the default model's weights, and a perturbation of some of them."""

from __future__ import annotations

import os

import torch

from pdserve.model.paths import default_model_path

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_NEW = 12
PER_PARAM = ["model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
BUCKET = ["model.layers.1.self_attn.k_proj.weight", "model.layers.2.mlp.up_proj.weight"]


def load_hf():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return hf.eval()


def perturbed(hf) -> dict[str, torch.Tensor]:
    """New values for PER_PARAM + BUCKET that change greedy output."""
    params = dict(hf.named_parameters())
    g = torch.Generator().manual_seed(0)
    return {
        PER_PARAM[0]: -params[PER_PARAM[0]].detach().clone(),
        PER_PARAM[1]: params[PER_PARAM[1]].detach() * 1.3,
        BUCKET[0]: params[BUCKET[0]].detach() + 0.05 * torch.randn(params[BUCKET[0]].shape, generator=g),
        BUCKET[1]: params[BUCKET[1]].detach() * 0.7,
    }


def hf_generate(hf, new: dict[str, torch.Tensor] | None = None) -> list[list[int]]:
    """Greedy continuations of PROMPTS, with `new` weights put into the model first."""
    from pdserve.model.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    params = dict(hf.named_parameters())
    outs = []
    with torch.no_grad():
        for n, t in (new or {}).items():
            params[n].copy_(t)
        for p in PROMPTS:
            ids = tok.encode(p, add_special_tokens=False)
            g = hf.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=2
            )
            outs.append(g[0, len(ids) :].tolist())
    return outs
