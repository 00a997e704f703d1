"""Start-up checks that need no model load: the model files, the architecture, and flags
that depend on the model (--tp-size against its KV heads). Each failure is a ValueError
whose message names the flag and the fix, so `pdserve serve` and `pdserve launch` can
exit at once with one line instead of failing in the scheduler seconds later.
"""

from __future__ import annotations

import glob
import json
import os
import struct

from pdserve.config import ServerArgs
from pdserve.setting_checks import hub_name_hint

HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GGUF_ARCHS = ("llama", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _dir_problem(path: str, tokenizer_path: str | None) -> str | None:
    what = "expected a Hugging Face model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"--model-path {path!r} has no config.json: {what}"
    if not glob.glob(os.path.join(path, "*.safetensors")):
        return f"--model-path {path!r} has no *.safetensors weights: {what}"
    if tokenizer_path is None and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return (
            f"--model-path {path!r} has no tokenizer (tokenizer.json or tokenizer_config.json): "
            f"copy the model's tokenizer files there or pass --tokenizer-path"
        )
    return None


def _hf_heads(path: str) -> tuple[str, int]:
    with open(os.path.join(path, "config.json")) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-path {path!r}: config.json is not valid JSON ({e})") from None
    model_type = cfg.get("model_type", "llama")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"--model-path {path!r}: model_type {model_type!r} is not supported; "
            f"pdserve runs {', '.join(HF_MODEL_TYPES)} models"
        )
    heads = cfg.get("num_attention_heads")
    return model_type, int(cfg.get("num_key_value_heads") or heads or 0)


# GGUF metadata value types -> struct formats (strings and arrays are handled apart)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: str, wanted: set[str]) -> dict:
    """The `wanted` keys of a GGUF file's metadata, read from its header only (the gguf
    package's reader maps every tensor too: seconds, where this takes milliseconds)."""
    out: dict = {}
    with open(path, "rb") as f:

        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError("truncated header")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(vtype: int):
            if vtype in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                itype, count = read("I"), read("Q")
                if itype in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[itype]), 1)
                else:
                    for _ in range(count):
                        value(itype)
                return None
            raise ValueError(f"unknown metadata type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = read("I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key, vtype = string(), read("I")
            v = value(vtype)
            if key in wanted:
                out[key] = v
                if len(out) == len(wanted):
                    break
    return out


def _gguf_heads(path: str) -> tuple[str, int]:
    try:
        arch = gguf_metadata(path, {"general.architecture"}).get("general.architecture")
        if arch not in GGUF_ARCHS:
            raise ValueError(
                f"--model-path {path!r}: GGUF architecture {arch!r} is not supported; "
                f"pdserve runs {', '.join(GGUF_ARCHS)} models"
            )
        keys = {f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"}
        meta = gguf_metadata(path, keys)
    except (OSError, UnicodeError, ValueError) as e:
        if str(e).startswith("--model-path"):
            raise
        raise ValueError(f"--model-path {path!r}: cannot read it as a GGUF file ({e})") from None
    heads = meta.get(f"{arch}.attention.head_count")
    return arch, int(meta.get(f"{arch}.attention.head_count_kv") or heads or 0)


UNIFIED_MEMORY_GEOMETRY = ("unified_memory_blocks", "unified_memory_block_size", "unified_memory_page_size")
SLO_SETTINGS = ("slo_ttft_target", "slo_tpot_target", "slo_monitoring_interval", "slo_window_size")


def check_semi_pd(args: ServerArgs) -> None:
    """Semi-PD settings a server cannot honour: ValueError naming the flag, before anything
    starts. (Values were validated by ServerArgs.) What works and what not: docs/semi_pd.md."""

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def changed(name: str) -> bool:
        return getattr(args, name) != getattr(ServerArgs, name)

    for n in UNIFIED_MEMORY_GEOMETRY:
        if changed(n):
            raise ValueError(
                f"{flag(n)}: not yet supported by the server: under --enable-semi-pd the unified KV "
                f"pool is the server's page pool, sized by --max-total-tokens / --mem-fraction-static "
                f"and --page-size (the block geometry flags apply to pdserve.semi_pd's "
                f"UnifiedMemoryManager only; docs/semi_pd.md)"
            )
    if not args.semi_pd_enabled:
        for n in ("initial_prefill_sm", "initial_decode_sm", "semi_pd_switch", *SLO_SETTINGS):
            if changed(n):
                raise ValueError(f"{flag(n)}: a Semi-PD setting: it needs --enable-semi-pd")
    elif not (args.enable_slo_aware or args.enable_semi_pd_coordinator):
        for n in SLO_SETTINGS:
            if changed(n):
                raise ValueError(f"{flag(n)}: only the SLO-aware controller uses it: add --enable-slo-aware")


def check_model(args: ServerArgs, *, tp_flags: dict[str, int] | None = None) -> None:
    """Raises ValueError (message: flag + fix) for model files pdserve cannot serve, or a
    --tp-size the model cannot be split over (`tp_flags`: flag -> tp size, default
    {"--tp-size": args.tp_size}). Reads headers and config.json only."""
    from pdserve.model.paths import resolve_model_path

    check_semi_pd(args)
    tp_flags = tp_flags or {"--tp-size": args.tp_size}
    try:
        path = resolve_model_path(args.model_path)
    except FileNotFoundError as e:
        raise ValueError(hub_name_hint(args.model_path or "") or str(e)) from None
    if os.path.isdir(path):
        problem = _dir_problem(path, args.tokenizer_path)
        if problem:
            raise ValueError(problem)
        arch, kv_heads = _hf_heads(path)
    elif os.path.isfile(path) and path.endswith(".gguf"):
        if max(tp_flags.values()) == 1:
            return  # nothing else to check; the architecture is checked on load
        arch, kv_heads = _gguf_heads(path)
    else:
        raise ValueError(
            f"--model-path {path!r}: expected a Hugging Face model directory "
            f"(config.json, *.safetensors, tokenizer.json) or a .gguf file"
        )
    for flag, tp in tp_flags.items():
        if kv_heads and tp > kv_heads:
            raise ValueError(
                f"{flag} {tp}: this {arch} model has {kv_heads} KV heads and every "
                f"tensor-parallel rank needs at least one; use a tp size from 1 to {kv_heads}"
            )
