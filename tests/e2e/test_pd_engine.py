"""`pdserve.PDEngine`: a prefill and a decode runtime in this Python program, paired per
request (issue #15); greedy output equals the reference (= mode null), batched and streamed,
and both runtimes' KV pools are free afterwards."""

import pytest

import pdserve
from tests.weights_reference import MAX_NEW, PROMPTS, hf_generate, load_hf

pytestmark = pytest.mark.e2e

GREEDY = {"max_new_tokens": MAX_NEW, "temperature": 0}


def test_pd_engine_pair_equals_the_reference():
    with pdserve.PDEngine(num_prefill=1, num_decode=1, dtype="float32", max_total_tokens=4096) as engine:
        outs = engine.generate(PROMPTS, GREEDY)
        got = [o["output_ids"] for o in outs]
        assert got == hf_generate(load_hf())
        chunks = list(engine.generate(PROMPTS[0], GREEDY, stream=True))
        assert chunks[-1]["output_ids"] == got[0]
        # by hand: the two runtimes and one bootstrap room, as the router does
        p, d = engine.prefill[0], engine.decode[0]
        with pytest.raises(ValueError, match="bootstrap_room"):
            d.generate(PROMPTS[0], GREEDY)
        for e in (p, d):
            load = e.get_load()
            assert load["num_used_pages"] == 0 and load["num_running_reqs"] == 0, load


def test_pd_engine_refuses_what_it_sets():
    with pytest.raises(ValueError, match="disaggregation_mode is set by PDEngine"):
        pdserve.PDEngine(disaggregation_mode="prefill")
    with pytest.raises(ValueError, match="num_decode"):
        pdserve.PDEngine(num_decode=0)
