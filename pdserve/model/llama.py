"""Llama-family forward (Llama/SmolLM2, Qwen2 with qkv bias, Qwen3 with q/k norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.model.attention import BaseAttentionBackend, ForwardBatch
from pdserve.model.config import ModelConfig
from pdserve.model.fused_ops import CpuFusedOps, Int8Sums, fused_ops_for
from pdserve.model.grid import Q4Grid, Q8Grid, grid_available, grid_linear, q4_grid, q8_grid
from pdserve.model.linears import (
    GRID_LAYER_MAX_ROWS,
    LOGIT_EXACT_ROWS,
    LOGIT_STEPS,
    int8_linear,
    linear,
    pack_weight,
    packed_linear,
    quantize_int4,
    quantize_int8,
    row_counts,
)


def _rope_tables(cfg: ModelConfig, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    t = torch.arange(max_pos, dtype=torch.int64).float()
    freqs = torch.outer(t, inv)
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_pos, D], HF's half-rotation layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (transformers' form), without building rotate_half(x):
    the first half is x1*cos1 - x2*sin1, the second x2*cos2 + x1*sin2. Each element is rounded
    exactly as in the reference form ((-a)*b is -(a*b), and a + (-b) is a - b), so the result is
    bitwise the same, with two fewer passes over the tensor and no concatenation."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' LlamaRMSNorm computes it: statistics and scaling in fp32, the
    normalized activations rounded to the model dtype, then multiplied by the weight in the
    model dtype. torch's fused `F.rms_norm(x, shape, w)` rounds once, after the weight, and in
    bf16 that moved enough activations by one ulp to change the README example's first token
    (docs/benchmarks.md, "bf16 agreement"); this form is bit-identical to transformers'."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * w


class Layer:
    __slots__ = (
        "in_norm", "post_norm", "qkv", "qkv_b", "o", "gate_up", "down", "q_norm", "k_norm", "q4", "packed", "q8",
    )  # fmt: skip


DERIVED = ("q4", "packed", "q8")  # Layer slots built from the weights (derive_layer), never loaded


LINEAR_NAMES = ("qkv", "o", "gate_up", "down")  # a layer's linear weights


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random weights for unit tests (tiny configs)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.08

    state["model.embed_tokens.weight"] = rnd(cfg.vocab_size, cfg.hidden_size)
    state["model.norm.weight"] = 1 + rnd(cfg.hidden_size)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1 + rnd(cfg.hidden_size)
        state[p + "post_attention_layernorm.weight"] = 1 + rnd(cfg.hidden_size)
        state[p + "self_attn.q_proj.weight"] = rnd(cfg.q_size, cfg.hidden_size)
        state[p + "self_attn.k_proj.weight"] = rnd(cfg.kv_size, cfg.hidden_size)
        state[p + "self_attn.v_proj.weight"] = rnd(cfg.kv_size, cfg.hidden_size)
        state[p + "self_attn.o_proj.weight"] = rnd(cfg.hidden_size, cfg.q_size)
        state[p + "mlp.gate_proj.weight"] = rnd(cfg.intermediate_size, cfg.hidden_size)
        state[p + "mlp.up_proj.weight"] = rnd(cfg.intermediate_size, cfg.hidden_size)
        state[p + "mlp.down_proj.weight"] = rnd(cfg.hidden_size, cfg.intermediate_size)
        if cfg.qkv_bias:
            for n, size in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
                state[p + f"self_attn.{n}_proj.bias"] = rnd(size)
        if cfg.qk_norm:
            state[p + "self_attn.q_norm.weight"] = 1 + rnd(cfg.head_dim)
            state[p + "self_attn.k_norm.weight"] = 1 + rnd(cfg.head_dim)
    return state


class LlamaModel:
    """Weights as plain tensors with fused qkv and gate_up projections."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        q4_max_tokens: int = 0,
        computes_logits: bool = True,
        int8_linears: bool = False,
    ) -> None:
        self.config = config
        self.dtype = dtype
        # --quantization w8a8_int8: the layers' linears run int8_linear (lm_head stays in dtype)
        self.int8_linears = int8_linears
        # False on tensor-parallel ranks other than 0: they run the layers only (no lm_head)
        self.computes_logits = computes_logits
        # steps of at most this many tokens multiply by 4-bit weights (0 = never). float32: the
        # weights' own GGUF grid through pdserve's kernel, exact (pdserve/model/grid.py), where
        # the kernel builds with AVX-512 or AVX2 + FMA + F16C; bf16: torch's int4 matmul on a
        # re-quantized copy. With --quantization w8a8_int8 too, such steps take the 4-bit copies
        # and larger ones int8 (--w4-decode-max-tokens 0 keeps every step in int8, batch-invariant).
        self.grid = dtype == torch.float32 and q4_max_tokens > 0 and grid_available()
        self.q4_max_tokens = q4_max_tokens if dtype == torch.bfloat16 or self.grid else 0
        self.lm_head_grid: Q4Grid | Q8Grid | None = None
        self.layers: list[Layer] = []
        max_pos = config.max_position_embeddings
        cos, sin = _rope_tables(config, max_pos)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.embed: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.lm_head: torch.Tensor | None = None
        self.lm_head_packed: torch.Tensor | None = None
        # tensor parallel (pdserve/model/tp.py): the whole model's config, and an in-place sum
        # over the ranks of o_proj's and down_proj's partial outputs; None on a single rank
        self.full_config = config
        self.all_reduce = None
        # fused CPU element-wise kernels (pdserve/model/fused_ops.py), set by use_fused_ops();
        # None: the torch form below, the portable reference
        self.fused_ops: CpuFusedOps | None = None

    # ---- weights -------------------------------------------------------------------------
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        cfg, dt = self.config, self.dtype

        def get(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"checkpoint is missing tensor {name}")
            return state[name].to(dt).contiguous()

        fused = {"embed": get("model.embed_tokens.weight"), "norm": get("model.norm.weight")}
        if not (cfg.tie_word_embeddings or "lm_head.weight" not in state):
            fused["lm_head"] = get("lm_head.weight")
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            q = f"layers.{i}."
            fused[q + "in_norm"] = get(p + "input_layernorm.weight")
            fused[q + "post_norm"] = get(p + "post_attention_layernorm.weight")
            fused[q + "qkv"] = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]).contiguous()
            if cfg.qkv_bias:
                fused[q + "qkv_b"] = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            fused[q + "o"] = get(p + "self_attn.o_proj.weight")
            fused[q + "gate_up"] = torch.cat(
                [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]
            ).contiguous()
            fused[q + "down"] = get(p + "mlp.down_proj.weight")
            if cfg.qk_norm:
                fused[q + "q_norm"] = get(p + "self_attn.q_norm.weight")
                fused[q + "k_norm"] = get(p + "self_attn.k_norm.weight")
        self.adopt_weights(fused)

    def adopt_weights(self, fused: dict[str, torch.Tensor]) -> None:
        """Use fused weights as they are, named as `named_weights()` names them (no copy: e.g.
        views into a shared-memory segment, so Semi-PD's workers share one copy). The derived
        copies (4-bit, int8 or oneDNN-prepacked: `derive_layer`) are built here: prepacked
        tensors are opaque (no storage to share), so each process packs its own."""
        self.embed = fused["embed"]
        self.norm = fused["norm"]
        self.lm_head = fused.get("lm_head", self.embed)  # absent: tied to the embedding
        self.layers = []
        for i in range(self.config.num_layers):
            layer = Layer()
            for n in Layer.__slots__:
                if n not in DERIVED:
                    setattr(layer, n, fused.get(f"layers.{i}.{n}"))
            self.layers.append(layer)
            self.derive_layer(i)
        self.derive_head()

    def derive_head(self) -> None:
        """(Re)build lm_head's derived copies: oneDNN's prepacked one, and in float32 its grid
        (the default GGUF's lm_head is its Q8_0 embedding). bf16 has no 4-bit lm_head."""
        self.lm_head_packed = pack_weight(self.lm_head) if self.computes_logits else None
        if self.grid and self.computes_logits:
            self.lm_head_grid = q8_grid(self.lm_head) or q4_grid(self.lm_head)
        else:
            self.lm_head_grid = None

    def derive_layer(self, i: int) -> None:
        """(Re)build layer i's derived copies of its linear weights, the ones forward uses: int8
        (--quantization w8a8_int8) or oneDNN's prepacked ones, plus the 4-bit decode copies."""
        layer = self.layers[i]
        if not self.q4_max_tokens:
            layer.q4 = None
        elif self.grid:  # only the linears whose weights are exactly on a grid
            grids = {n: q4_grid(getattr(layer, n)) for n in LINEAR_NAMES}
            layer.q4 = {n: g for n, g in grids.items() if g is not None}
        else:
            layer.q4 = {n: quantize_int4(getattr(layer, n)) for n in LINEAR_NAMES}
        if self.int8_linears:
            layer.q8 = {n: quantize_int8(getattr(layer, n)) for n in LINEAR_NAMES}
            layer.packed = {n: None for n in LINEAR_NAMES}  # unused: no second copy of the weights
        else:
            layer.q8 = None
            layer.packed = {n: pack_weight(getattr(layer, n)) for n in LINEAR_NAMES}

    def init_random(self, seed: int = 0) -> None:
        """Random weights for unit tests (tiny configs)."""
        self.load_weights(random_state(self.config, seed))

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Fused weights by name, e.g. for RL weight sync and memory accounting."""
        out = {"embed": self.embed, "norm": self.norm}
        if self.lm_head is not self.embed:
            out["lm_head"] = self.lm_head
        for i, layer in enumerate(self.layers):
            for n in Layer.__slots__:
                t = getattr(layer, n)
                if isinstance(t, torch.Tensor):
                    out[f"layers.{i}.{n}"] = t
        return out

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.named_weights().values())

    def use_fused_ops(self, enabled: bool) -> bool:
        """Run the element-wise work (residual add + RMSNorm, RoPE, SiLU * up) through the fused
        CPU kernels where they exist for this model's dtype (fused_ops_for); False: torch's ops.
        Returns whether the kernels are in use."""
        # CPU ops; forward checks each batch's device (GPU tensors keep the torch form)
        self.fused_ops = fused_ops_for(torch.device("cpu"), self.dtype) if enabled else None
        return self.fused_ops is not None

    # ---- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, attn: BaseAttentionBackend) -> torch.Tensor | None:
        """Returns float32 logits [N, vocab] for `batch.logits_indices` (None where the model does
        not compute logits: tensor-parallel ranks other than 0)."""
        cfg = self.config
        eps = cfg.rms_norm_eps
        hd, nq, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        qs, ks = cfg.q_size, cfg.kv_size
        h = self.embed[batch.input_ids]  # [T, hidden]
        fo = self.fused_ops if h.device.type == "cpu" else None
        if fo is None or cfg.qk_norm:
            cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, D]
            sin = self.sin[batch.positions].unsqueeze(1)
        T = h.shape[0]
        small = T <= (min(self.q4_max_tokens, GRID_LAYER_MAX_ROWS) if self.grid else self.q4_max_tokens)
        ar = self.all_reduce
        inter = cfg.intermediate_size
        # int8 mode: the fused ops also quantize the linears' inputs, except in steps that
        # multiply by the 4-bit copies (small ones, --w4-decode-max-tokens)
        quant = fo is not None and self.int8_linears and not (small and self.q4_max_tokens > 0)
        # int8 mode without tensor parallelism: o_proj, gate_up and down_proj hand their int32
        # sums (Int8Sums) to the fused op that follows, which scales them back on the fly
        raw = quant and ar is None
        a = None  # the last down_proj output, not yet added into h (fused into the next norm)

        def add_norm(a: torch.Tensor | Int8Sums | None, w: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
            """h += a (when a is given), then RMSNorm(h) * w; in int8 mode also the result's int8
            rows and scales for the next linear (one fused pass on CPU)."""
            if fo is None:
                if a is not None:
                    h.add_(a)  # h is this forward's own tensor (the embedding rows were gathered into it)
                return rms_norm(h, w, eps), None
            if isinstance(a, Int8Sums):
                return fo.add_rms_norm_i32(h, a, w, eps, quant=True)
            if quant:
                return fo.add_rms_norm(h, a, w, eps, quant=True)
            return fo.add_rms_norm(h, a, w, eps), None

        for i, layer in enumerate(self.layers):
            q4 = layer.q4 or {}
            q8 = layer.q8 or {}
            pk = layer.packed
            x, pre = add_norm(a, layer.in_norm)  # pre: x's int8 rows + scales (w8a8_int8) or None
            qkv = linear(x, layer.qkv, q4.get("qkv"), small, pk["qkv"], q8.get("qkv"), pre, fo)
            if layer.qkv_b is not None:
                qkv = qkv + layer.qkv_b
            v = qkv[:, qs + ks :].view(T, nkv, hd)
            if layer.q_norm is not None:
                q = apply_rope(rms_norm(qkv[:, :qs].view(T, nq, hd), layer.q_norm, eps), cos, sin)
                k = apply_rope(rms_norm(qkv[:, qs : qs + ks].view(T, nkv, hd), layer.k_norm, eps), cos, sin)
            elif fo is not None:  # q and k rotated in place in qkv, one pass
                fo.rope_qk_(qkv, batch.positions, self.cos, self.sin, nq + nkv)
                q, k = qkv[:, :qs].view(T, nq, hd), qkv[:, qs : qs + ks].view(T, nkv, hd)
            else:  # q and k side by side in qkv: one pass over both
                qk = apply_rope(qkv[:, : qs + ks].view(T, nq + nkv, hd), cos, sin)
                q, k = qk[:, :nq], qk[:, nq:]
            o = attn(i, q, k, v, batch).view(T, qs)
            pre = fo.int8_quant(o) if quant else None
            a = linear(o, layer.o, q4.get("o"), small, pk["o"], q8.get("o"), pre, fo, raw)
            if ar is not None:
                ar(a)
            x, pre = add_norm(a, layer.post_norm)
            gu = linear(x, layer.gate_up, q4.get("gate_up"), small, pk["gate_up"], q8.get("gate_up"), pre, fo, raw)
            if fo is None:
                act = F.silu(gu[:, :inter])
                act *= gu[:, inter:]
            elif isinstance(gu, Int8Sums):
                act, pre = fo.silu_mul_i32(gu, h.dtype, quant=True)
            elif quant:
                act, pre = fo.silu_mul(gu, quant=True)
            else:
                act = fo.silu_mul(gu)
            a = linear(act, layer.down, q4.get("down"), small, pk["down"], q8.get("down"), pre, fo, raw)
            if ar is not None:
                ar(a)
            if fo is None:
                h += a
                a = None
        if not self.computes_logits:
            return None
        if batch.logits_indices is not None:
            h = h[batch.logits_indices]
            if isinstance(a, Int8Sums):
                a = a.select(batch.logits_indices)
            elif a is not None:
                a = a[batch.logits_indices]
        if h.shape[0] == 0:  # a mid-prompt chunk samples nothing
            return torch.empty(0, self.lm_head.shape[0], dtype=torch.float32)
        if fo is None:
            h = rms_norm(h, self.norm, eps)
        elif a is None:
            h = fo.rms_norm(h, self.norm, eps)
        elif isinstance(a, Int8Sums):
            h = fo.add_rms_norm_i32(h.contiguous(), a, self.norm, eps)
        else:
            h = fo.add_rms_norm(h.contiguous(), a.contiguous(), self.norm, eps)
        if self.lm_head_grid is not None and h.shape[0] <= self.q4_max_tokens:
            return grid_linear(h, self.lm_head_grid)
        if self.lm_head_packed is not None:
            return packed_linear(h, self.lm_head_packed, LOGIT_EXACT_ROWS, LOGIT_STEPS).float()
        return F.linear(h, self.lm_head).float()

    @torch.inference_mode()
    def prebuild_linear_shapes(self, max_rows: int, max_logit_rows: int) -> int:
        """Run every prepacked linear shape once at every row count the server can meet (up to
        `max_rows` rows per step, `max_logit_rows` sampled rows), so oneDNN builds its
        primitives now and not while serving: RSS stays flat afterwards (issue #10). oneDNN
        caches per shape, so one layer's weights stand for all. Returns the shapes built."""
        built = 0
        if not self.layers:
            return built
        for name, q8 in (self.layers[0].q8 or {}).items():
            k = getattr(self.layers[0], name).shape[1]
            for m in row_counts(max_rows):
                int8_linear(torch.zeros(m, k, dtype=self.dtype), q8)
                built += 1
        for name, packed in self.layers[0].packed.items():
            if packed is None:
                continue
            k = getattr(self.layers[0], name).shape[1]
            for m in row_counts(max_rows):
                packed_linear(torch.zeros(m, k, dtype=self.dtype), packed)
                built += 1
        if self.lm_head_packed is not None:
            for m in row_counts(max_logit_rows, LOGIT_EXACT_ROWS, LOGIT_STEPS):
                packed_linear(
                    torch.zeros(m, self.lm_head.shape[1], dtype=self.dtype),
                    self.lm_head_packed,
                    LOGIT_EXACT_ROWS,
                    LOGIT_STEPS,
                )
                built += 1
        return built
