"""Request parsing for /generate and the OpenAI endpoints: every mistake is a
ValueError with a message naming the field (the HTTP layer turns it into 400)."""

from __future__ import annotations

from typing import Any

import msgspec

from pdserve.engine.sampling_params import SamplingParams

_SP_FIELDS = set(SamplingParams.__struct_fields__)


def _type_err(name: str, want: str, got: Any) -> ValueError:
    return ValueError(f"{name} must be {want}, got {type(got).__name__}")


def sampling_from_dict(d: Any, name: str = "sampling_params") -> SamplingParams:
    if d is None:
        return SamplingParams()
    if not isinstance(d, dict):
        raise _type_err(name, "an object", d)
    d = dict(d)
    if isinstance(d.get("stop"), str):
        d["stop"] = [d["stop"]]
    if d.get("stop") is None:
        d.pop("stop", None)
    if d.get("stop_token_ids") is None:
        d.pop("stop_token_ids", None)
    known = {k: v for k, v in d.items() if k in _SP_FIELDS}
    try:
        return msgspec.convert(known, SamplingParams, strict=False)
    except msgspec.ValidationError as e:
        raise ValueError(f"{name}: {e}") from None


def as_bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_err(key, "a boolean", v)
    return v


def as_int(body: dict, key: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_err(key, "an integer", v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{key} must be in [{lo}, {hi}], got {v}")
    return v


def is_token_list(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def openai_sampling(body: dict, default_max_tokens: int, chat: bool) -> SamplingParams:
    """Map OpenAI fields (+ SGLang/vLLM extras) to SamplingParams."""
    d: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    d["max_new_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    for k in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
              "seed", "ignore_eos", "stop_token_ids", "skip_special_tokens", "n"):
        if body.get(k) is not None:
            d[k] = body[k]
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a string or a list of strings")
        d["stop"] = stop
    return sampling_from_dict(d, "request")
