"""pdserve.engine.grammar: the token mask matches xgrammar's own, a masked greedy walk
yields text the regex fullmatches, logit_bias, and request parsing of the new fields."""

import re
from types import SimpleNamespace

import pytest
import torch

from pdserve.engine.grammar import GrammarBackend, apply_grammar_masks, validate_spec
from pdserve.sampling_params import SamplingParams
from pdserve.model.sampler import apply_logit_bias
from pdserve.model.tokenizer import load_tokenizer
from pdserve.server.protocol import FieldError, openai_sampling, sampling_from_dict

xgr = pytest.importorskip("xgrammar")
VOCAB = 49152


@pytest.fixture(scope="module")
def backend():
    tok = load_tokenizer(None, None)
    return GrammarBackend(tok, VOCAB, [tok.eos_token_id]), tok


def fake_req(state, out=(), bias=None):
    return SimpleNamespace(grammar=state, output_ids=list(out), sampling=SamplingParams(logit_bias=bias))


def test_mask_matches_xgrammar_and_walk_fullmatches(backend):
    be, tok = backend
    rx = r"[0-9]{2,3}-[a-z]{2}"
    st = be.new_state("regex", rx)
    out: list[int] = []
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        logits = torch.randn(2, VOCAB, generator=g)
        ref = logits[0].clone().unsqueeze(0)
        bm = xgr.allocate_token_bitmask(1, VOCAB)
        st.matcher.fill_next_token_bitmask(bm, 0)
        xgr.apply_token_bitmask_inplace(ref, bm)
        plain = logits[1].clone()
        reqs = [fake_req(st, out), SimpleNamespace(grammar=None, output_ids=[])]
        apply_grammar_masks(logits, reqs)
        assert torch.equal(torch.isinf(logits[0]), torch.isinf(ref[0]))
        assert torch.equal(logits[1], plain)  # a request without a grammar is untouched
        t = int(logits[0].argmax())
        out.append(t)
        st.sync(out)
        if st.terminated:
            break
    assert st.terminated and out[-1] == tok.eos_token_id
    assert re.fullmatch(rx, tok.decode(out[:-1]))


def test_sync_rejects_a_token_outside_the_grammar(backend):
    be, tok = backend
    st = be.new_state("ebnf", 'root ::= "yes"')
    no = tok.encode("no", add_special_tokens=False)
    assert not st.sync(no) and st.failed


def test_logit_bias_adds_to_its_row_only():
    logits = torch.zeros(2, 10)
    apply_logit_bias(logits, [fake_req(None, bias={3: 100.0, 4: -100.0}).sampling, fake_req(None).sampling])
    assert logits[0, 3] == 100 and logits[0, 4] == -100 and logits[1].abs().sum() == 0


def test_validate_spec_names_the_kind():
    validate_spec("json_schema", '{"type": "object"}')
    for kind, spec in [("regex", "("), ("json_schema", "{nope"), ("ebnf", "root ::= missing")]:
        with pytest.raises(ValueError, match=kind):
            validate_spec(kind, spec)


def test_request_parsing():
    with pytest.raises(FieldError) as e:
        sampling_from_dict({"max_new_tokens": 2, "foo": 1})
    assert e.value.param == "sampling_params.foo"
    sp = sampling_from_dict({"logit_bias": {"7": 5}, "json_schema": {"type": "object"}})
    assert sp.logit_bias == {7: 5.0} and sp.grammar == ("json_schema", '{"type": "object"}')
    sp, names = openai_sampling({"max_tokens": 3, "response_format": {"type": "json_object"}}, 16, chat=True)
    assert sp.grammar[0] == "json_schema" and names["json_schema"] == "response_format"
    with pytest.raises(ValueError, match="^max_tokens"):
        sp, names = openai_sampling({"max_tokens": -1}, 16, chat=True)
        sp.verify(VOCAB, "", names)
    with pytest.raises(FieldError, match="at most one"):
        sampling_from_dict({"regex": "a", "ebnf": 'root ::= "a"'}).verify(VOCAB)
