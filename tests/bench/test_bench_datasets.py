import json
import random

import pytest

from pdserve.bench import datasets as ds


def test_random_fixed_lengths(word_tokenizer):
    reqs = ds.random_requests(word_tokenizer, 20, ds.RandomSpec(32, 7, 1.0), seed=0)
    assert len(reqs) == 20
    for r in reqs:
        assert r.prompt_len == 32 == len(word_tokenizer.encode(r.prompt))
        assert r.output_len == 7
        assert 0 not in word_tokenizer.encode(r.prompt)  # no special tokens
    assert reqs == ds.random_requests(word_tokenizer, 20, ds.RandomSpec(32, 7, 1.0), seed=0)
    assert reqs != ds.random_requests(word_tokenizer, 20, ds.RandomSpec(32, 7, 1.0), seed=1)


def test_random_range_ratio(word_tokenizer):
    reqs = ds.random_requests(word_tokenizer, 200, ds.RandomSpec(100, 40, 0.5), seed=0)
    ins = [r.prompt_len for r in reqs]
    outs = [r.output_len for r in reqs]
    assert min(ins) >= 50 and max(ins) <= 100 and len(set(ins)) > 20
    assert min(outs) >= 20 and max(outs) <= 40


def test_random_text_with_merging_tokenizer():
    """Decoding random ids can create merges ("1" "2" -> "12"): counts still come out exact."""

    class Merging:
        vocab_size = 11  # ids 0-9 are the digits, id 10 is the merged pair "12"
        all_special_ids = []

        def encode(self, text, add_special_tokens=False):
            ids, i = [], 0
            while i < len(text):
                if text.startswith("12", i):
                    ids.append(10)
                    i += 2
                else:
                    ids.append(int(text[i]))
                    i += 1
            return ids

        def decode(self, ids):
            return "".join("12" if i == 10 else str(i) for i in ids)

    tok = Merging()
    for seed in range(20):
        text, n = ds.random_text(tok, 40, random.Random(seed), list(range(11)))
        assert n == 40 == len(tok.encode(text))


def test_shared_prefix(word_tokenizer):
    spec = ds.SharedPrefixSpec(num_groups=3, prompts_per_group=4, system_prompt_len=50, question_len=5, output_len=9)
    reqs = ds.shared_prefix_requests(word_tokenizer, spec, seed=0)
    assert len(reqs) == 12
    groups: dict[str, list[ds.BenchRequest]] = {}
    for r in reqs:
        groups.setdefault(r.kind, []).append(r)
        assert r.prompt_len == 55 and r.output_len == 9
    assert len(groups) == 3
    prefixes = set()
    for members in groups.values():
        heads = {tuple(word_tokenizer.encode(r.prompt)[:50]) for r in members}
        assert len(heads) == 1  # one shared prefix per group
        assert len({r.prompt for r in members}) == 4  # distinct questions
        prefixes |= heads
    assert len(prefixes) == 3
    assert [r.kind for r in reqs] != sorted(r.kind for r in reqs)  # groups interleaved


def test_mixed(word_tokenizer):
    spec = ds.MixedSpec(ds.RandomSpec(16, 8, 1.0), long_input_len=200, long_fraction=0.25)
    reqs = ds.mixed_requests(word_tokenizer, 40, spec, seed=0)
    longs = [r for r in reqs if r.kind == "long"]
    assert len(longs) == 10 and all(r.prompt_len == 200 for r in longs)
    assert all(r.prompt_len == 16 for r in reqs if r.kind == "short")
    assert all(r.output_len == 8 for r in reqs)
    first_long = [i for i, r in enumerate(reqs) if r.kind == "long"]
    assert first_long != list(range(10))  # spread out, not all first


def test_jsonl(tmp_path, word_tokenizer):
    p = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a b c", "output_len": 5}, {"text": "d e"}, {"prompt": "f", "max_tokens": 2}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    reqs = ds.jsonl_requests(word_tokenizer, str(p), None, default_output_len=11)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(3, 5), (2, 11), (1, 2)]
    assert len(ds.jsonl_requests(word_tokenizer, str(p), 2, 11)) == 2
    p.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=":2: not JSON"):
        ds.jsonl_requests(word_tokenizer, str(p), None, 11)
    p.write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="string 'prompt'"):
        ds.jsonl_requests(word_tokenizer, str(p), None, 11)


def test_bad_specs(word_tokenizer):
    with pytest.raises(ValueError, match="--random-range-ratio"):
        ds.random_requests(word_tokenizer, 2, ds.RandomSpec(8, 8, 1.5), 0)
    with pytest.raises(ValueError, match="--num-prompts"):
        ds.random_requests(word_tokenizer, 0, ds.RandomSpec(8, 8, 1.0), 0)
    with pytest.raises(ValueError, match="--mixed-long-fraction"):
        ds.mixed_requests(word_tokenizer, 4, ds.MixedSpec(long_fraction=2.0), 0)
