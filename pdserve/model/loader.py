"""Weights from a GGUF file (dequantized once with `gguf`) or a HF safetensors dir.

Weights come out in Hugging Face naming (`model.layers.0.self_attn.q_proj.weight`)
as float32 CPU tensors; `LlamaModel.load_weights` fuses and casts them.
Dequantizing a GGUF takes seconds, so the result is cached as a safetensors file
under `~/.cache/pdserve` (or `$PDSERVE_CACHE_DIR`), keyed by path, size and mtime.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import torch

from pdserve.model.config import ModelConfig
from pdserve.model.paths import cache_dir, file_key

logger = logging.getLogger(__name__)

_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def load_model_files(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, HF-named float32 state dict) from a GGUF file or HF directory."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _load_gguf_cached(path)
    if os.path.isdir(path):
        return _load_hf_dir(path)
    raise ValueError(f"--model-path {path!r}: expected a .gguf file or a directory with config.json")


def _load_hf_dir(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--model-path {path!r} has no config.json")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    config = ModelConfig.from_hf(hf_cfg)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"--model-path {path!r} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    if "lm_head.weight" not in state:
        config = _replace(config, tie_word_embeddings=True)
    return config, state


def _replace(cfg: ModelConfig, **kw) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, **kw)


def _load_gguf_cached(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file, save_file

    base = os.path.join(cache_dir(), f"gguf-{file_key(path)}")
    wfile, cfile = base + ".safetensors", base + ".config.json"
    if os.path.isfile(wfile) and os.path.isfile(cfile):
        with open(cfile) as f:
            raw = json.load(f)
        raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
        return ModelConfig(**raw), load_file(wfile)
    config, state = load_gguf(path)
    # float32: the dequantized values (fp16 scale * q + fp16 min) are exact only in fp32,
    # and the transformers reference dequantizes to fp32 too.
    tmp = wfile + f".tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, wfile)
    with open(cfile, "w") as f:
        json.dump(config.__dict__, f)
    return config, load_file(wfile)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> HF half rotation)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(path)

    def field(name: str, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in _GGUF_ARCH:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {list(_GGUF_ARCH)})")
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    eos = field("tokenizer.ggml.eos_token_id")
    vocab = field(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = ModelConfig(
        arch=_GGUF_ARCH[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_layers=int(field(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(field(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(field(f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(field(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        eos_token_ids=(int(eos),) if eos is not None else (),
    )
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.asarray(arr, dtype=np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name.startswith("blk."):
            _, idx, part, kind = name.split(".", 3)
            if part not in _GGUF_NAMES:
                logger.warning("skipping unknown GGUF tensor %s", name)
                continue
            if arch == "llama" and part == "attn_q":
                arr = _unpermute(arr, heads)
            elif arch == "llama" and part == "attn_k":
                arr = _unpermute(arr, config.num_kv_heads)
            hf = f"model.layers.{idx}.{_GGUF_NAMES[part]}.{kind}"
        else:
            logger.warning("skipping unknown GGUF tensor %s", name)
            continue
        state[hf] = torch.from_numpy(np.ascontiguousarray(arr))
    return config, state
