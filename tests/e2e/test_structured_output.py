"""Structured output (xgrammar), logit_bias, and "nothing silently ignored" on the real
server (the session `server` fixture: float32 default model). docs/api.md."""

import json
import re

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age"],
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
}


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def validate(doc, schema):
    try:
        import jsonschema
    except ImportError:  # by hand: the keys and their types
        assert set(doc) == set(schema["properties"]) and isinstance(doc["name"], str)
        assert isinstance(doc["age"], int) and not isinstance(doc["age"], bool)
        return
    jsonschema.validate(doc, schema)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none")


def test_chat_json_object_parses(server):
    r = post(
        server,
        "/v1/chat/completions",
        {"messages": PERSON, "max_tokens": 48, "temperature": 0, "response_format": {"type": "json_object"}},
    )
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert isinstance(json.loads(ch["message"]["content"]), dict)
    assert ch["finish_reason"] == "stop"


def test_json_object_with_top_logprobs_is_valid_json(server):
    """Tokens the grammar bans have logprob -inf: reported as OpenAI's floor -9999.0, so the
    body stays valid JSON (no -Infinity)."""
    r = post(
        server,
        "/v1/chat/completions",
        {
            "messages": PERSON,
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 5,
            "response_format": {"type": "json_object"},
        },
    )
    assert r.status_code == 200, r.text
    body = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0]["token"].startswith("{") and len(content[0]["top_logprobs"]) == 5
    assert all(-9999.0 <= t["logprob"] <= 0 for c in content for t in c["top_logprobs"])


def test_openai_client_json_schema_validates(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=PERSON,
        max_tokens=48,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].finish_reason == "stop"


def test_openai_client_stream_and_sampled_json_schema(client):
    """Streamed, and sampled at temperature 1 (n=2): still valid by construction."""
    s = client.chat.completions.create(
        model=MODEL,
        messages=PERSON,
        max_tokens=48,
        temperature=1.0,
        seed=3,
        n=2,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    texts = ["", ""]
    for ch in s:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    for t in texts:
        validate(json.loads(t), SCHEMA)


def test_completions_json_object(client):
    r = client.completions.create(
        model=MODEL,
        prompt="A JSON object describing a cat:",
        max_tokens=48,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    assert isinstance(json.loads(r.choices[0].text), dict)


def test_generate_regex_fullmatches(server):
    rx = r"(yes|no), because [a-z ]{1,20}\."
    r = post(
        server,
        "/generate",
        {"text": "Is the sky blue? Answer:", "sampling_params": {"max_new_tokens": 32, "temperature": 0, "regex": rx}},
    )
    assert r.status_code == 200, r.text
    assert re.fullmatch(rx, r.json()["text"]), r.json()["text"]
    assert r.json()["meta_info"]["finish_reason"]["type"] == "stop"


def test_generate_ebnf_and_json_schema_string(server):
    g = 'root ::= "The answer is " ("yes" | "no") "."'
    r = post(
        server,
        "/generate",
        {"text": "Is water wet?", "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ebnf": g}},
    )
    assert r.json()["text"] in ("The answer is yes.", "The answer is no.")
    r = post(
        server,
        "/generate",
        {
            "text": "Person as JSON:",
            "sampling_params": {"max_new_tokens": 48, "temperature": 0, "json_schema": json.dumps(SCHEMA)},
        },
    )
    validate(json.loads(r.json()["text"]), SCHEMA)


def test_logit_bias_bans_and_forces_tokens(server):
    text = "The capital of France is"
    first = post(server, "/generate", {"text": text, "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    t0 = first.json()["output_ids"][0]
    base = {"prompt": text, "max_tokens": 1, "temperature": 0}
    plain = post(server, "/v1/completions", base).json()["choices"][0]["text"]
    banned = post(server, "/v1/completions", {**base, "logit_bias": {str(t0): -100}})
    assert banned.status_code == 200 and banned.json()["choices"][0]["text"] != plain
    # SGLang's sampling_params.logit_bias on /generate, the same rule
    r = post(
        server,
        "/generate",
        {"text": text, "sampling_params": {"max_new_tokens": 1, "temperature": 0, "logit_bias": {str(t0): -100}}},
    )
    assert r.json()["output_ids"][0] != t0
    forced = post(
        server,
        "/generate",
        {"text": text, "sampling_params": {"max_new_tokens": 3, "temperature": 0.7, "logit_bias": {"42": 100}}},
    )
    assert forced.json()["output_ids"] == [42, 42, 42]
    chat = post(
        server,
        "/v1/chat/completions",
        {"messages": PERSON, "max_tokens": 3, "temperature": 0, "logit_bias": {"42": 100}},
    )
    assert chat.json()["choices"][0]["message"]["content"] == forced.json()["text"]


def test_usage_counts_the_prompt_once_with_n(server):
    body = {"messages": PERSON, "max_tokens": 2, "temperature": 0}
    one = post(server, "/v1/chat/completions", body).json()["usage"]
    two = post(server, "/v1/chat/completions", {**body, "n": 2}).json()["usage"]
    assert two["prompt_tokens"] == one["prompt_tokens"] > 0
    assert two["completion_tokens"] == 4 and two["total_tokens"] == one["prompt_tokens"] + 4


CHAT = {"messages": PERSON, "max_tokens": 2}
COMP = {"prompt": "Hi", "max_tokens": 2}
GEN = {"text": "Hi"}


@pytest.mark.parametrize(
    "path,body,param,needle",
    [
        (
            "/v1/chat/completions",
            {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            "chat template",
        ),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice", "tool"),
        ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions", "not supported"),
        (
            "/v1/chat/completions",
            {
                **CHAT,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        ],
                    }
                ],
            },
            "messages[0].content[1]",
            "image_url",
        ),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "logprobs"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, "response_format.type", "xml"),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "schema",
        ),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"42": 101}}, "logit_bias", "[-100, 100]"),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"99999999": 1}}, "logit_bias", "token ids"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "many"}, "max_tokens", "max_tokens"),
        (
            "/v1/chat/completions",
            {**CHAT, "max_completion_tokens": -1},
            "max_completion_tokens",
            "max_completion_tokens",
        ),
        ("/v1/chat/completions", {**CHAT, "foo": 1}, "foo", "foo"),
        ("/v1/completions", {**COMP, "best_of": 2}, "best_of", "best_of"),
        ("/v1/completions", {**COMP, "suffix": "!"}, "suffix", "suffix"),
        ("/v1/completions", {**COMP, "foo": 1}, "foo", "foo"),
        ("/v1/completions", {**COMP, "logit_bias": [1]}, "logit_bias", "logit_bias"),
        ("/v1/completions", {**COMP, "regex": "("}, "regex", "regex"),
        ("/generate", {**GEN, "sampling_params": {"foo": 1}}, "sampling_params.foo", "sampling_params.foo"),
        ("/generate", {**GEN, "sampling_params": {"regex": "("}}, "sampling_params.regex", "regex"),
        (
            "/generate",
            {**GEN, "sampling_params": {"json_schema": "{not json"}},
            "sampling_params.json_schema",
            "json_schema",
        ),
        ("/generate", {**GEN, "sampling_params": {"ebnf": "root ::= undefined_rule"}}, "sampling_params.ebnf", "ebnf"),
        ("/generate", {**GEN, "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}}, None, "at most one"),
    ],
)
def test_unimplemented_fields_are_400_naming_them(server, path, body, param, needle):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    assert "max_new_tokens" not in err["message"] or path == "/generate", err
