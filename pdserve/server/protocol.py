"""Request parsing for /generate and the OpenAI endpoints: every mistake is a
ValueError with a message naming the field (the HTTP layer turns it into 400)."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from pdserve.sampling_params import FieldError, SamplingParams

_SP_FIELDS = set(SamplingParams.__struct_fields__)


def _type_err(name: str, want: str, got: Any) -> ValueError:
    return FieldError(f"{name} must be {want}, got {type(got).__name__}", name)


def parse_logit_bias(v: Any, name: str = "logit_bias") -> dict[int, float] | None:
    """OpenAI's logit_bias: {"<token id>": bias in [-100, 100]}; integer keys accepted too."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _type_err(name, "an object mapping token ids to biases", v)
    out: dict[int, float] = {}
    for k, b in v.items():
        if isinstance(k, int) and not isinstance(k, bool):
            t = k
        elif isinstance(k, str) and re.fullmatch(r"\s*\d+\s*", k):
            t = int(k)
        else:
            raise FieldError(f"{name} keys must be token ids (integers as strings), got {k!r}", name)
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise FieldError(f"{name} values must be numbers, got {type(b).__name__} for {k!r}", name)
        if not (-100 <= b <= 100):
            raise FieldError(f"{name} values must be in [-100, 100], got {b} for {k!r}", name)
        out[t] = float(b)
    return out


def sampling_from_dict(d: Any, name: str = "sampling_params", names: dict[str, str] | None = None) -> SamplingParams:
    """`names`: field -> the request key it came from (OpenAI routes), for error messages.
    Without it (the native API) an unknown key is an error naming it, as in SGLang."""
    if d is None:
        return SamplingParams()
    if not isinstance(d, dict):
        raise _type_err(name, "an object", d)
    d = dict(d)
    if isinstance(d.get("stop"), str):
        d["stop"] = [d["stop"]]
    for k in ("stop", "stop_token_ids", "logit_bias", "json_schema", "regex", "ebnf"):
        if d.get(k) is None:
            d.pop(k, None)
    unknown = [k for k in d if k not in _SP_FIELDS]
    if unknown:
        raise FieldError(
            f"{name}.{unknown[0]} is not a supported sampling parameter; supported: {', '.join(sorted(_SP_FIELDS))}",
            f"{name}.{unknown[0]}",
        )
    if "logit_bias" in d:
        d["logit_bias"] = parse_logit_bias(d["logit_bias"], (names or {}).get("logit_bias", f"{name}.logit_bias"))
    if isinstance(d.get("json_schema"), (dict, list)):  # accept the schema itself too
        d["json_schema"] = json.dumps(d["json_schema"])
    try:
        return msgspec.convert(d, SamplingParams, strict=False)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = re.search(r"at `\$\.(\w+)", msg)
        if m and names is not None:
            field = names.get(m.group(1), m.group(1))
            raise FieldError(f"{field}: {msg.replace(m.group(0), 'at `' + field)}", field) from None
        raise FieldError(f"{name}: {msg}", f"{name}.{m.group(1)}" if m else name) from None


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
        raise FieldError(f"{key} must be in [{lo}, {hi}], got {v}", key)
    return v


def is_token_list(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


# Request keys of the OpenAI routes. Anything else is a 400 naming the key: a field we
# do not implement must not be accepted and silently ignored (docs/api.md).
_COMMON_KEYS = {
    "model",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "logit_bias",
    "response_format",
    "user",
    "service_tier",
    "store",  # no effect on the output: accepted (store only false)
    # SGLang / vLLM extras
    "top_k",
    "min_p",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "regex",
    "ebnf",
    # PD: set by the router
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
}
CHAT_KEYS = _COMMON_KEYS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}
COMPLETION_KEYS = _COMMON_KEYS | {"prompt", "echo", "best_of", "suffix"}
# OpenAI fields we know and do not implement: a clearer message than "unknown"
_NOT_IMPLEMENTED = {
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "metadata",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
}


def check_openai_fields(body: dict, chat: bool) -> None:
    """400 (FieldError naming the key) for every field that would otherwise be ignored."""
    allowed = CHAT_KEYS if chat else COMPLETION_KEYS
    for k in body:
        if k in allowed:
            continue
        if k == "repetition_penalty":  # vLLM/SGLang extra; `vllm bench serve` sends the no-op 1.0
            v = body[k]
            if v is None or (type(v) in (int, float) and v == 1):
                continue
            raise FieldError(f"repetition_penalty is supported only as 1.0, got {v!r}", k)
        if k in _NOT_IMPLEMENTED:
            raise FieldError(f"{k} is not supported by this server", k)
        raise FieldError(f"unrecognized request argument: {k}", k)
    if body.get("store") not in (None, False):
        raise FieldError("store is not supported by this server (only store: false)", "store")
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _type_err("stream_options", "an object", so)
        for k in so:
            if k != "include_usage":
                raise FieldError(f"stream_options.{k} is not supported (only include_usage)", f"stream_options.{k}")
        if not body.get("stream"):
            raise FieldError("stream_options is only allowed when stream is true", "stream_options")
    if chat:
        if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
            raise FieldError("top_logprobs requires logprobs to be true", "top_logprobs")
    else:
        if body.get("best_of") not in (None, 1):
            raise FieldError(f"best_of is not supported (only 1), got {body['best_of']!r}", "best_of")
        if body.get("suffix") is not None:
            raise FieldError("suffix is not supported by this server", "suffix")
        if body.get("echo"):
            raise FieldError("echo is not supported", "echo")


def response_format_grammar(rf: Any) -> tuple[str, str] | None:
    """OpenAI response_format -> ("json_schema", schema as a JSON string) or None."""
    from pdserve.engine.grammar import JSON_OBJECT_SCHEMA

    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise FieldError("response_format must be an object with a type", "response_format")
    t = rf["type"]
    if t == "text":
        return None
    if t == "json_object":
        return "json_schema", JSON_OBJECT_SCHEMA
    if t == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise FieldError(
                "response_format.json_schema must be an object {name, schema, strict}", "response_format.json_schema"
            )
        schema = js.get("schema")
        if schema is None:
            schema = {"type": "object"}  # OpenAI allows a name without a schema
        if not isinstance(schema, (dict, bool)):
            raise FieldError(
                "response_format.json_schema.schema must be a JSON Schema object", "response_format.json_schema.schema"
            )
        return "json_schema", json.dumps(schema)
    raise FieldError(
        f"response_format.type {t!r} is not supported (text, json_object, json_schema)", "response_format.type"
    )


def openai_sampling(body: dict, default_max_tokens: int, chat: bool) -> tuple[SamplingParams, dict[str, str]]:
    """Map OpenAI fields (+ SGLang/vLLM extras) to SamplingParams; also returns
    field -> request key, so that errors name what the client sent."""
    check_openai_fields(body, chat)
    d: dict[str, Any] = {}
    names = {"max_new_tokens": "max_tokens"}
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    else:
        names["max_new_tokens"] = "max_completion_tokens"
    d["max_new_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    for k in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "seed",
        "ignore_eos",
        "stop_token_ids",
        "skip_special_tokens",
        "n",
        "regex",
        "ebnf",
    ):
        if body.get(k) is not None:
            d[k] = body[k]
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise FieldError("stop must be a string or a list of strings", "stop")
        d["stop"] = stop
    if body.get("logit_bias") is not None:
        d["logit_bias"] = parse_logit_bias(body["logit_bias"])
    g = response_format_grammar(body.get("response_format"))
    if g is not None:
        d[g[0]] = g[1]
        names[g[0]] = "response_format"
    sp = sampling_from_dict(d, "request", names)
    return sp, names


def chat_message(m: dict, i: int) -> dict:
    """messages[i] as the chat template gets it: content as one string; an assistant's
    `tool_calls` with arguments as objects; a tool result's `tool_call_id`."""
    content = m.get("content")
    role = m["role"]
    if isinstance(content, list):  # [{type: text, text: ...}]; other parts are refused
        texts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise FieldError(
                    f"{where}: only text content parts are supported by this model"
                    + (f", got {kind!r}" if isinstance(kind, str) else ""),
                    where,
                )
            texts.append(part["text"])
        content = "".join(texts)
    out: dict = {"role": role}
    for k in m:
        if k in ("role", "content"):
            continue
        where = f"messages[{i}].{k}"
        if k == "name" and isinstance(m[k], str):
            out["name"] = m[k]
        elif k == "tool_calls" and role == "assistant":
            if m[k] is not None:
                out["tool_calls"] = _template_tool_calls(m[k], where)
        elif k == "tool_call_id" and role == "tool":
            if not isinstance(m[k], str):
                raise FieldError(f"{where} must be a string", where)
            out["tool_call_id"] = m[k]
        else:
            raise FieldError(f"{where} is not supported by this server", where)
    if content is None and out.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise FieldError("message content must be a string or a list of text parts", f"messages[{i}].content")
    out["content"] = content
    return out


def _template_tool_calls(raw, where: str) -> list[dict]:
    """An assistant message's `tool_calls` (OpenAI shape, arguments as JSON text) in the
    shape chat templates render: arguments as an object."""
    if not isinstance(raw, list):
        raise FieldError(f"{where} must be a list", where)
    out = []
    for j, c in enumerate(raw):
        w = f"{where}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise FieldError(f'{w} must be {{id, type: "function", function: {{name, arguments}}}}', w)
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise FieldError(f"{w}.function.arguments is not valid JSON", f"{w}.function.arguments") from None
        if not isinstance(args, dict):
            raise FieldError(f"{w}.function.arguments must be a JSON object", f"{w}.function.arguments")
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out
