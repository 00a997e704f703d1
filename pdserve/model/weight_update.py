"""Weights by their Hugging Face names, for RL weight sync (issue #15).

The model keeps fused tensors (q/k/v in one `qkv`, gate/up in one `gate_up`) and derived
copies (oneDNN's prepacked layout, the 4-bit grid). A trainer names weights as Hugging Face
does (`model.layers.3.self_attn.k_proj.weight`). `hf_views` maps each such name to a view
into the fused tensor; `apply_named_weights` checks a whole update first (every name known,
every shape equal, every dtype a float type) and only then copies it in and rebuilds the
derived copies of the layers it touched, so a bad update leaves the old weights in place.
"""

from __future__ import annotations

import re

import torch

from pdserve.model.llama import LlamaModel
from pdserve.model.tp import full_shape

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' -> torch.bfloat16; any other type is an error."""
    key = name.removeprefix("torch.") if isinstance(name, str) else None
    if key not in FLOAT_DTYPES:
        raise ValueError(f"dtype {name!r} is not a weight dtype; one of {sorted(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[key]


def hf_views(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Every weight under its Hugging Face name, as a view into the model's own tensors
    (writing a view writes the model). Tied embeddings answer to both names."""
    cfg = model.config
    qs, ks = cfg.q_size, cfg.kv_size
    inter = cfg.intermediate_size
    out = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm, "lm_head.weight": model.lm_head}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.in_norm
        out[p + "post_attention_layernorm.weight"] = layer.post_norm
        for n, a, b in (("q", 0, qs), ("k", qs, qs + ks), ("v", qs + ks, qs + 2 * ks)):
            out[p + f"self_attn.{n}_proj.weight"] = layer.qkv[a:b]
            if layer.qkv_b is not None:
                out[p + f"self_attn.{n}_proj.bias"] = layer.qkv_b[a:b]
        out[p + "self_attn.o_proj.weight"] = layer.o
        out[p + "mlp.gate_proj.weight"] = layer.gate_up[:inter]
        out[p + "mlp.up_proj.weight"] = layer.gate_up[inter:]
        out[p + "mlp.down_proj.weight"] = layer.down
        if layer.q_norm is not None:
            out[p + "self_attn.q_norm.weight"] = layer.q_norm
            out[p + "self_attn.k_norm.weight"] = layer.k_norm
    return out


def check_named_weights(model: LlamaModel, shapes: dict[str, tuple[int, ...]], whole: bool = True) -> None:
    """Raise ValueError naming the first weight whose name is unknown or whose shape differs:
    from the whole model's shape (what a trainer sends) or, with whole=False, from this
    tensor-parallel rank's shard of it."""
    views = hf_views(model)
    for name, shape in shapes.items():
        view = views.get(name)
        if view is None:
            raise ValueError(
                f"unknown weight name {name!r} (Hugging Face names, e.g. 'model.layers.0.self_attn.q_proj.weight')"
            )
        want = full_shape(name, tuple(view.shape), model.full_config) if whole else tuple(view.shape)
        if want != tuple(shape):
            raise ValueError(f"weight {name!r} has shape {list(want)} in this model, got {list(shape)}")


def check_float(named: dict[str, torch.Tensor]) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"weight {name!r} must be a floating-point tensor")


@torch.inference_mode()
def apply_named_weights(model: LlamaModel, named: dict[str, torch.Tensor]) -> int:
    """Copy `named` (Hugging Face names) into the model, all or nothing. Returns the number
    of layers whose derived copies were rebuilt. Under tensor parallelism `named` holds this
    rank's shards (pdserve.model.tp.shard_state)."""
    check_float(named)
    check_named_weights(model, {n: tuple(t.shape) for n, t in named.items()}, whole=False)
    views = hf_views(model)
    touched: set[int] = set()
    head = False
    for name, t in named.items():
        views[name].copy_(t.to(model.dtype))
        m = _LAYER.match(name)
        if m:
            touched.add(int(m.group(1)))
        elif name in ("lm_head.weight", "model.embed_tokens.weight"):
            head = True
    for i in sorted(touched):
        refresh_layer(model, i)
    if head:
        model.derive_head()
    return len(touched)


def refresh_layer(model: LlamaModel, i: int) -> None:
    """Rebuild layer i's prepacked, int8 and 4-bit copies from its plain weights."""
    model.derive_layer(i)


def weight_view(model: LlamaModel, name: str) -> torch.Tensor:
    """This rank's tensor of weight `name` (its shard under tensor parallelism)."""
    view = hf_views(model).get(name)
    if view is None:
        raise ValueError(f"unknown weight name {name!r}")
    return view


def weight_rows(model: LlamaModel, name: str, truncate_size: int) -> list:
    """The first `truncate_size` rows of a weight as nested lists (SGLang's
    /get_weights_by_name answer)."""
    return weight_view(model, name)[:truncate_size].float().tolist()
