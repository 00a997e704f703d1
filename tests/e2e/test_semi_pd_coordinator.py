"""The seed's coordinator API (pdserve/server/semi_pd_coordinator.py) on the real model."""

import pytest

from pdserve.semi_pd.allocation import SMAllocation
from pdserve.server.semi_pd_coordinator import create_semi_pd_coordinator

pytestmark = pytest.mark.e2e


def test_coordinator_lifecycle_status_reallocation_memory():
    coordinator = create_semi_pd_coordinator(
        server_args={"dtype": "float32", "max_total_tokens": 4096, "slo_ttft_target": 5000.0, "slo_tpot_target": 1000.0}
    )
    assert coordinator.get_status() == {"is_running": False, "components": {}}
    with coordinator:
        status = coordinator.get_status()
        assert status["is_running"] and status["components"]["slo_controller"]
        assert status["current_split"] == {"prefill_percentage": 70, "decode_percentage": 30}
        out = coordinator.generate("The capital of France is", {"max_new_tokens": 8, "temperature": 0})
        assert out["meta_info"]["completion_tokens"] == 8 and "Paris" in out["text"]
        assert coordinator.request_sm_reallocation(SMAllocation(prefill_percentage=50, decode_percentage=50))
        assert coordinator.get_status()["current_split"] == {"prefill_percentage": 50, "decode_percentage": 50}
        mem = coordinator.get_unified_memory_usage()
        assert mem["total_memory_bytes"] > 0 and mem["allocated_memory_bytes"] == 0 and mem["utilization_ratio"] == 0
        assert coordinator.get_metrics()["num_ttft_samples"] == 1
        assert coordinator.get_status()["slo"]["ttft_target_ms"] == 5000.0
    assert not coordinator.is_running and coordinator.get_unified_memory_usage() is None


def test_coordinator_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="port_args: not yet supported"):
        create_semi_pd_coordinator({}, port_args=object())
    with pytest.raises(ValueError, match="--initial-prefill-sm"):
        create_semi_pd_coordinator({"initial_prefill_sm": 90, "initial_decode_sm": 20})
    with pytest.raises(RuntimeError, match="not running"):
        create_semi_pd_coordinator({}).request_sm_reallocation(SMAllocation(50, 50))
