"""1P1D with the transfer engines (gloo, NIXL, Mooncake) through `pdserve launch`: the real
servers move KV with each engine, and the output equals mode null token for token,
concurrent requests included; both pools are free afterwards. The engine-level contract
(placement, tp head slicing, aborts, timeouts, malformed frames) is tests/disagg, run for
every backend."""

import concurrent.futures as cf

import httpx
import pytest

from tests.disagg.helpers import ENGINE_BACKENDS
from tests.e2e.test_pd import PROMPTS, SP, Launch, pools_free, reference  # noqa: F401 (fixture)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("backend", ["gloo", *ENGINE_BACKENDS])
def test_pd_with_engine_equals_mode_null(backend, reference):
    pd = Launch(backend, "shared")
    try:

        def one(p):
            return httpx.post(pd.url + "/generate", json={"text": p, "sampling_params": SP}, timeout=300).json()

        with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
            outs = list(ex.map(one, PROMPTS))
        assert [o["output_ids"] for o in outs] == [r["output_ids"] for r in reference]
        assert all(o["meta_info"]["transfer_time"] is not None for o in outs)
        load = httpx.get(pd.decode + "/get_load", timeout=10).json()
        assert load["kv_transfers_completed"] >= len(PROMPTS) and load["num_failed_transfers"] == 0
        pools_free(pd)
    finally:
        pd.stop()
