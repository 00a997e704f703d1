"""Tool calling on real servers with the official openai client (docs/api.md, "Tool
calling"): the default model with the ChatML tools template from examples/, and a
Qwen2-architecture checkpoint whose own template renders tools (parser chosen from the
architecture, no flag)."""

import json
import os

import jsonschema
import openai
import pytest

from tests.conftest import ServerProc

pytestmark = pytest.mark.e2e
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPLATE = os.path.join(ROOT, "examples", "tool_chat_template_chatml.jinja")
WEATHER = {
    "type": "object",
    "required": ["city"],
    "additionalProperties": False,
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a city",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"type": "string", "maxLength": 40}},
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def client():
    s = ServerProc(
        "--dtype", "float32", "--max-total-tokens", "8192", "--chat-template", TEMPLATE, "--tool-call-parser", "hermes"
    )
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="none")
    assert s.wait_idle_and_free()["num_used_pages"] == 0
    s.stop()


def ask(client, **kw):
    return client.chat.completions.create(
        model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=64, **kw
    )


def test_required_gives_a_valid_call(client):
    r = ask(client, tool_choice="required")
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls  # parallel_tool_calls unset: one call
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(args, schema)


def test_named_function_is_the_one_called(client):
    r = ask(client, tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])


def test_streamed_call_equals_the_whole_one(client):
    whole = ask(client, tool_choice="required").choices[0].message.tool_calls[0]
    content, calls, finish = "", {}, None
    for chunk in ask(client, tool_choice="required", stream=True):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    assert content == "" and finish == "tool_calls"
    assert calls == {0: {"name": whole.function.name, "arguments": whole.function.arguments}}


def test_tool_result_round_trip(client):
    """The call and its result go back in: the template renders them, the model answers."""
    call = ask(client, tool_choice="required").choices[0].message.tool_calls[0]
    msgs = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'},
    ]
    r = client.chat.completions.create(
        model="default", messages=msgs, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=24
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    with_tools = client.chat.completions.create(model="default", messages=msgs, temperature=0, max_tokens=1)
    assert r.usage.prompt_tokens == with_tools.usage.prompt_tokens  # "none": tools are not rendered


def test_auto_without_a_call_is_plain_text(client):
    r = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS, temperature=0, max_tokens=16
    )
    ch = r.choices[0]
    if ch.message.tool_calls is None:  # the model chose to answer; either way the shape is right
        assert ch.message.content and "<tool_call>" not in ch.message.content
        assert ch.finish_reason in ("stop", "length")
    else:
        assert ch.finish_reason == "tool_calls"


def test_bad_tool_choice_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, tool_choice={"type": "function", "function": {"name": "nope"}})
    err = e.value.body.get("error", e.value.body)  # the client unwraps {"error": ...} itself
    assert err["param"] == "tool_choice" and "nope" in err["message"]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A tiny random Qwen2 checkpoint with the default model's tokenizer and the tools
    template as its own chat template: the server must pick the parser from the arch."""
    import torch
    import transformers as tf

    from pdserve.model.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    tf.Qwen2ForCausalLM(cfg).save_pretrained(d)
    tok = load_tokenizer(None, None)
    tok.chat_template = open(TEMPLATE).read()
    tok.save_pretrained(d)
    return str(d)


def test_qwen2_arch_picks_the_parser(qwen2_dir):
    s = ServerProc("--model-path", qwen2_dir, "--dtype", "float32", "--max-total-tokens", "4096")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        unit = {
            "type": "object",
            "required": ["unit"],
            "additionalProperties": False,
            "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        }
        r = c.chat.completions.create(
            model="default",
            messages=ASK,
            temperature=0,
            max_tokens=64,
            tools=[{"type": "function", "function": {"name": "set_unit", "parameters": unit}}],
            tool_choice="required",
        )
        (call,) = r.choices[0].message.tool_calls  # a random model, but the grammar makes it valid
        assert call.function.name == "set_unit"
        jsonschema.validate(json.loads(call.function.arguments), unit)
    finally:
        s.stop()


def test_pd_call_equals_mode_null(client):
    """Through the router (1P1D): prefill samples the first token under the call grammar,
    decode continues it; the call equals mode null's."""
    from tests.e2e.test_pd import Launch

    pd = Launch("tcp", "shared", f"--server-args=--chat-template {TEMPLATE} --tool-call-parser hermes")
    try:
        c = openai.OpenAI(base_url=pd.url + "/v1", api_key="none")
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            ref = ask(client, tool_choice=choice).choices[0]
            got = c.chat.completions.create(
                model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=64, tool_choice=choice
            ).choices[0]
            assert got.finish_reason == ref.finish_reason == "tool_calls"
            assert [(t.function.name, t.function.arguments) for t in got.message.tool_calls] == [
                (t.function.name, t.function.arguments) for t in ref.message.tool_calls
            ]
    finally:
        pd.stop()
