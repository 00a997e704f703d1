"""Greedy output of pdserve (float32) equals transformers' on the same GGUF weights,
token for token; one by one and all at once; the KV pool is free afterwards."""

import os

import pytest
import torch

from pdserve.model.paths import default_model_path

pytestmark = pytest.mark.e2e

TEXTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Explain photosynthesis to a child. " * 3,
    "Hi",
    "The history of the Roman Empire is long and complex. " * 12,  # ~130 tokens
    "Translate to French: I like apples and oranges, but I do not like bananas. " * 30,  # ~500 tokens
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def tokenizer():
    from pdserve.model.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    out = []
    for i, t in enumerate(TEXTS):
        if i % 2 == 0:  # half through the chat template, half raw
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        else:
            ids = tokenizer.encode(t, add_special_tokens=False)
        out.append(list(ids))
    return out


@pytest.fixture(scope="module")
def reference(prompts):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    torch.set_num_threads(2)
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    hf.eval()
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            g = hf.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=2
            )
            refs.append(g[0, len(ids) :].tolist())
    del hf
    return refs


@pytest.fixture(scope="module")
def engine():
    import pdserve

    e = pdserve.Engine(dtype="float32", max_total_tokens=8192, chunked_prefill_size=256)
    yield e
    e.shutdown()


def _strip(ids):
    return ids  # our output includes the EOS token when it stops, like transformers


def test_prompt_lengths_are_mixed(prompts):
    lens = sorted(len(p) for p in prompts)
    assert lens[0] < 10 and lens[-1] > 400


def test_one_by_one_matches_transformers(engine, prompts, reference):
    sp = {"max_new_tokens": MAX_NEW, "temperature": 0}
    for ids, ref in zip(prompts, reference):
        out = engine.generate(input_ids=ids, sampling_params=sp)
        assert out["output_ids"] == ref
    assert engine.get_load()["num_used_pages"] == 0


def test_all_at_once_matches_transformers(engine, prompts, reference):
    engine.flush_cache()
    sp = {"max_new_tokens": MAX_NEW, "temperature": 0}
    outs = engine.generate(input_ids=prompts, sampling_params=sp)
    assert [o["output_ids"] for o in outs] == reference
    # the same batch again runs off the prefix cache and must not change
    outs = engine.generate(input_ids=prompts, sampling_params=sp)
    assert [o["output_ids"] for o in outs] == reference
    assert any(o["meta_info"]["cached_tokens"] > 0 for o in outs)
    assert engine.get_load()["num_used_pages"] == 0


def test_capital_of_france(engine, tokenizer):
    out = engine.generate(
        input_ids=tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=True
        )["input_ids"],
        sampling_params={"max_new_tokens": 20, "temperature": 0},
    )
    assert out["text"] == "The capital of France is Paris."
    assert out["meta_info"]["finish_reason"]["type"] == "stop"


def test_engine_streaming_equals_non_streaming(engine):
    sp = {"max_new_tokens": 16, "temperature": 0}
    full = engine.generate("Once upon a time", sp)
    chunks = list(engine.generate("Once upon a time", sp, stream=True))
    assert chunks[-1]["text"] == full["text"] and chunks[-1]["output_ids"] == full["output_ids"]
    assert len(chunks) > 1


def test_engine_async_stream(engine):
    import asyncio

    async def go():
        texts = []
        async for c in await engine.async_generate(
            "Once upon a time", {"max_new_tokens": 8, "temperature": 0}, stream=True
        ):
            texts.append(c["text"])
        return texts

    texts = asyncio.run(go())
    assert texts[-1] == engine.generate("Once upon a time", {"max_new_tokens": 8, "temperature": 0})["text"]


def test_engine_structured_output_and_unknown_key(engine):
    """pdserve.Engine takes SGLang's regex / ebnf / json_schema / logit_bias; an unknown
    sampling_params key is a ValueError naming it (docs/api.md)."""
    import json
    import re

    rx = r"[A-Z][a-z]+, [A-Z][a-z]+\."
    out = engine.generate("Name two cities:", {"max_new_tokens": 16, "temperature": 0, "regex": rx})
    assert re.fullmatch(rx, out["text"]), out["text"]
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}},
        "required": ["city"],
        "additionalProperties": False,
    }
    out = engine.generate(
        "A city as JSON:", {"max_new_tokens": 24, "temperature": 0, "json_schema": json.dumps(schema)}
    )
    assert list(json.loads(out["text"])) == ["city"]
    out = engine.generate("Hi", {"max_new_tokens": 2, "temperature": 0, "logit_bias": {"42": 100}})
    assert out["output_ids"] == [42, 42]
    with pytest.raises(ValueError, match="sampling_params.foo"):
        engine.generate("Hi", {"max_new_tokens": 2, "foo": 1})
    with pytest.raises(ValueError, match="regex"):
        engine.generate("Hi", {"max_new_tokens": 2, "regex": "("})


def test_overlap_event_loop_matches_transformers(prompts, reference):
    import pdserve

    with pdserve.Engine(dtype="float32", max_total_tokens=8192, disable_overlap_schedule=False) as e:
        outs = e.generate(input_ids=prompts, sampling_params={"max_new_tokens": MAX_NEW, "temperature": 0})
        assert [o["output_ids"] for o in outs] == reference
        assert e.get_load()["num_used_pages"] == 0
