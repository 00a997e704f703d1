"""Tool-call parsing (Hermes format: Qwen2/2.5/3), its streaming form, the grammar that
forces a call, and the validation of a request's tool fields (pdserve/server/tools)."""

import json

import pytest

from pdserve.server.protocol import FieldError, chat_message
from pdserve.server.tools.base import Tool
from pdserve.server.tools.registry import get_parser, parser_names
from pdserve.server.tools.request import plan_tools

WEATHER = {
    "type": "object",
    "required": ["city"],
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "now"}},
]
TEMPLATE = "{% for t in tools %}{{ t }}{% endfor %}"
P = get_parser("hermes")


def block(name, args):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


def test_aliases_registered():
    assert {"hermes", "qwen25", "qwen3"} <= set(parser_names())
    with pytest.raises(ValueError, match="hermes"):
        get_parser("nope")


def test_content_and_calls():
    out = P.parse("Let me check.\n" + block("get_weather", {"city": "Paris"}) + "\n" + block("get_time", {}))
    assert out.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert len({c.id for c in out.calls}) == 2 and all(c.id.startswith("call_") for c in out.calls)


def test_no_call_is_plain_content():
    assert P.parse("Paris is sunny.").calls == [] and P.parse("Paris is sunny.").content == "Paris is sunny."


def test_invalid_call_stays_content():
    text = 'ok <tool_call>\n{"name": "f", "arguments": {"a": 1</tool_call>'
    out = P.parse(text)
    assert out.calls == [] and out.content == text


def test_unclosed_last_call_still_parses():
    out = P.parse('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert [(c.name, c.arguments) for c in out.calls] == [("f", '{"a": 1}')]


@pytest.mark.parametrize(
    "text",
    [
        "Sure.\n" + block("get_weather", {"city": "Paris"}),
        "no calls here, but a < and <tool",
        block("get_time", {}) + block("get_weather", {"city": "Rome"}),
    ],
)
def test_streaming_char_by_char_equals_whole(text):
    s = P.stream()
    sent = "".join(s.feed(ch) for ch in text)
    end = s.finish()
    whole = P.parse(text)
    assert [(c.name, c.arguments) for c in end.calls] == [(c.name, c.arguments) for c in whole.calls]
    assert "<tool_call>" not in sent  # a call is never streamed as content
    assert (sent + (end.content or "")).strip() == (whole.content or "")


@pytest.fixture(scope="module")
def matches():
    import xgrammar as xgr

    from pdserve.model.tokenizer import load_tokenizer

    tok = load_tokenizer(None, None)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=49152))

    def whole_text_then_end(grammar: str, text: str) -> bool:
        m = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
        ids = tok.encode(text, add_special_tokens=False)
        return all(m.accept_token(i) for i in ids) and m.accept_token(tok.eos_token_id)

    return whole_text_then_end


def test_forced_grammar_accepts_calls_and_only_calls(matches):
    tools = [Tool("get_weather", None, WEATHER), Tool("get_time", None, {"type": "object", "properties": {}})]
    one = P.forced_grammar(tools, parallel=False)
    two = P.forced_grammar(tools, parallel=True)
    ok = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert matches(one, ok) and matches(two, ok)
    assert matches(two, ok + "\n" + '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert not matches(one, ok + "\n" + ok)  # parallel off: one call
    assert not matches(one, "Paris is sunny.")
    assert not matches(one, '<tool_call>\n{"name": "get_wether", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert not matches(one, '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')  # required


def plan(**body):
    return plan_tools({"messages": [], **body}, TEMPLATE, "hermes", "m")


def test_plan_modes():
    assert plan() is None and plan(tools=TOOLS, tool_choice="none") is None
    auto = plan(tools=TOOLS)
    assert auto.grammar is None and [t.name for t in auto.tools] == ["get_weather", "get_time"]
    assert plan(tools=TOOLS, tool_choice="required").grammar.count("get_") == 2
    assert "call)*" not in plan(tools=TOOLS, tool_choice="required").grammar  # one call unless asked
    assert "call)*" in plan(tools=TOOLS, tool_choice="required", parallel_tool_calls=True).grammar
    named = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert "get_time" in named.grammar and "get_weather" not in named.grammar
    assert auto.tools[1].as_openai() == {
        "type": "function",
        "function": {"name": "get_time", "description": "now", "parameters": {"type": "object", "properties": {}}},
    }


@pytest.mark.parametrize(
    "body,field",
    [
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]}, "tools[0].function.x"),
        ({"tools": TOOLS + TOOLS[:1]}, "tools[2].function.name"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_plan_errors_name_the_field(body, field):
    with pytest.raises(FieldError) as e:
        plan(**body)
    assert e.value.param == field, e.value


def test_template_without_tools_and_no_parser_are_clear_errors():
    with pytest.raises(FieldError, match="--chat-template"):
        plan_tools({"tools": TOOLS}, "{{ messages }}", "hermes", "m")
    with pytest.raises(FieldError, match="--tool-call-parser"):
        plan_tools({"tools": TOOLS}, TEMPLATE, None, "m")


def test_chat_message_tool_fields():
    m = chat_message(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
        1,
    )
    assert m == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}],
    }
    assert chat_message({"role": "tool", "tool_call_id": "call_1", "content": "18C"}, 2) == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "18C",
    }
    for bad, field in [
        (
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"role": "user", "content": "x", "tool_call_id": "a"}, "messages[0].tool_call_id"),
    ]:
        with pytest.raises(FieldError) as e:
            chat_message(bad, 0)
        assert e.value.param == field


def test_config_knows_every_parser_name():
    """ServerArgs validates --tool-call-parser against setting_checks.TOOL_CALL_PARSERS
    (config may not import the server layer): it must list exactly the registry's names."""
    from pdserve.setting_checks import TOOL_CALL_PARSERS

    assert sorted(TOOL_CALL_PARSERS) == parser_names()
