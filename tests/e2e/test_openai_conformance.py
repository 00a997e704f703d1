"""Every field of the official openai client's chat and completions request types, sent
through the client to the default server: each is either implemented (200, and its effect
checked where it has a visible one) or a 400 whose `param` names it. A field the client
gains in a later version is sent too and must be refused by name, never ignored."""

import typing

import openai
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

pytestmark = pytest.mark.e2e
MSGS = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# field -> (value, "ok" | "400"); a field not listed here is sent as {} and must be a 400
CHAT = {
    "audio": ({"voice": "alloy", "format": "wav"}, "400"),
    "frequency_penalty": (0.5, "ok"),
    "function_call": ("auto", "400"),
    "functions": ([{"name": "f", "parameters": {}}], "400"),
    "logit_bias": ({"60": -100}, "ok"),
    "logprobs": (True, "ok"),
    "max_completion_tokens": (3, "ok"),
    "max_tokens": (3, "ok"),
    "metadata": ({"k": "v"}, "400"),
    "modalities": (["text"], "400"),
    "n": (2, "ok"),
    "parallel_tool_calls": (False, "ok"),
    "prediction": ({"type": "content", "content": "1, 2"}, "400"),
    "presence_penalty": (0.5, "ok"),
    "prompt_cache_key": ("k", "400"),
    "reasoning_effort": ("low", "400"),
    "response_format": ({"type": "json_object"}, "ok"),
    "safety_identifier": ("s", "400"),
    "seed": (7, "ok"),
    "service_tier": ("auto", "ok"),
    "stop": (["2"], "ok"),  # greedy output starts "1. 1\n2. "
    "store": (False, "ok"),
    "stream_options": ({"include_usage": True}, "ok"),  # sent with stream=True
    "temperature": (0.0, "ok"),
    "tool_choice": ("none", "ok"),
    "tools": ([TOOL], "400"),  # the default model's template renders no tools (docs/api.md)
    "top_logprobs": (2, "ok"),  # sent with logprobs=True
    "top_p": (0.9, "ok"),
    "user": ("u", "ok"),
    "verbosity": ("low", "400"),
    "web_search_options": ({}, "400"),
}
COMPLETION = {
    "best_of": (1, "ok"),
    "echo": (False, "ok"),
    "frequency_penalty": (0.5, "ok"),
    "logit_bias": ({"60": -100}, "ok"),
    "logprobs": (2, "ok"),
    "max_tokens": (3, "ok"),
    "n": (2, "ok"),
    "presence_penalty": (0.5, "ok"),
    "seed": (7, "ok"),
    "stop": ([","], "ok"),
    "stream_options": ({"include_usage": True}, "ok"),
    "suffix": ("!", "400"),
    "temperature": (0.0, "ok"),
    "top_p": (0.9, "ok"),
    "user": ("u", "ok"),
}


def fields(params) -> list[str]:
    return sorted(typing.get_type_hints(params.CompletionCreateParamsBase))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def check_effect(field, value, r) -> None:
    """What an implemented field visibly does to the response."""
    ch = r.choices[0]
    if field in ("max_tokens", "max_completion_tokens"):
        assert r.usage.completion_tokens == 3
    elif field == "n":
        assert len(r.choices) == 2 and r.usage.completion_tokens == 2 * 8
    elif field in ("logprobs", "top_logprobs"):
        assert ch.logprobs is not None
        if field == "top_logprobs":
            assert len(ch.logprobs.content[0].top_logprobs) == 2
        elif hasattr(ch.logprobs, "top_logprobs") and isinstance(value, int):
            assert len(ch.logprobs.top_logprobs[0]) == 2
    elif field == "stop":
        text = ch.message.content if hasattr(ch, "message") else ch.text
        assert value[0] not in text and ch.finish_reason == "stop"
    elif field == "response_format":
        assert ch.message.content.lstrip().startswith("{")


def send(create, base: dict, field: str, value):
    kw = {**base, field: value}
    if field == "stream_options":
        chunks = list(create(**kw, stream=True))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        return None
    if field == "top_logprobs":
        kw["logprobs"] = True
    return create(**kw)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_every_client_field_is_implemented_or_refused_by_name(client, route):
    if route == "chat":
        table, names, create = CHAT, fields(chat_params), client.chat.completions.create
        base = {"model": "default", "messages": MSGS, "max_tokens": 8, "temperature": 0}
        required = {"messages", "model"}
    else:
        table, names, create = COMPLETION, fields(completion_params), client.completions.create
        base = {"model": "default", "prompt": "1, 2, 3, 4,", "max_tokens": 8, "temperature": 0}
        required = {"prompt", "model"}
    walked = []
    for field in names:
        if field in required:
            continue
        value, expect = table.get(field, ({}, "400"))
        if expect == "ok":
            r = send(create, base, field, value)
            if r is not None:
                check_effect(field, value, r)
        else:
            with pytest.raises(openai.BadRequestError) as e:
                send(create, base, field, value)
            err = e.value.body.get("error", e.value.body) if isinstance(e.value.body, dict) else {}
            assert err.get("param") == field, (field, e.value.body)
        walked.append(field)
    assert set(table) <= set(names) | {"stream_options"}, "the table names fields the client no longer has"
    assert len(walked) == len(names) - len(required)
