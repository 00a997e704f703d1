"""Metadata record and environment knobs."""

import logging
import math

import pytest

from pdserve.disagg.envs import TCP_PIECE_KB_DEFAULT, DisaggEnvs, default_thread_pool_size, tcp_piece_bytes
from pdserve.disagg.metadata import KVMetadata, MetadataError


def test_metadata_roundtrip():
    m = KVMetadata(
        room=(1 << 64) - 1, output_token_id=151643, output_logprob=-0.25, cached_tokens=32, prompt_tokens=100
    )
    data = m.pack()
    assert len(data) == KVMetadata.SIZE == 32
    assert KVMetadata.unpack(data, expected_room=m.room) == m
    nan = KVMetadata.unpack(KVMetadata(1, 2).pack())
    assert math.isnan(nan.output_logprob)


def test_metadata_room_mismatch_is_logged(caplog):
    data = KVMetadata(5, 1).pack()
    with caplog.at_level(logging.ERROR), pytest.raises(MetadataError, match="room 5, expected room 6"):
        KVMetadata.unpack(data, expected_room=6)
    assert "room mismatch" in caplog.text
    with pytest.raises(MetadataError):
        KVMetadata.unpack(data[:-1])
    with pytest.raises(MetadataError):
        KVMetadata(-1, 0)
    with pytest.raises(MetadataError):
        KVMetadata(1, 0, cached_tokens=1 << 32)


def test_env_defaults():
    e = DisaggEnvs.from_env({})
    assert (e.queue_size, e.bootstrap_timeout, e.heartbeat_interval, e.heartbeat_max_failure, e.waiting_timeout) == (
        4,
        300.0,
        5.0,
        2,
        300.0,
    )
    assert e.thread_pool_size == default_thread_pool_size()
    assert [default_thread_pool_size(n) for n in (1, 2, 64, 128, 1024)] == [4, 4, 6, 12, 12]


def test_env_overrides_and_precedence():
    env = {
        "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "600",
        "PDSERVE_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "7.5",
        "SGLANG_DISAGGREGATION_QUEUE_SIZE": "8",
        "SGLANG_DISAGGREGATION_THREAD_POOL_SIZE": "3",
    }
    e = DisaggEnvs.from_env(env)
    assert e.bootstrap_timeout == 7.5 and e.queue_size == 8 and e.thread_pool_size == 3


@pytest.mark.parametrize(
    "var,value",
    [
        ("SGLANG_DISAGGREGATION_QUEUE_SIZE", "zero"),
        ("SGLANG_DISAGGREGATION_QUEUE_SIZE", "0"),
        ("PDSERVE_DISAGGREGATION_HEARTBEAT_MAX_FAILURE", "1.5"),
        ("PDSERVE_DISAGGREGATION_WAITING_TIMEOUT", "-3"),
        ("SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL", "inf"),
        ("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "soon"),
    ],
)
def test_env_bad_values_name_the_variable(var, value):
    with pytest.raises(ValueError, match=var):
        DisaggEnvs.from_env({var: value})


def test_tcp_piece_size_knob():
    assert tcp_piece_bytes({}) == TCP_PIECE_KB_DEFAULT << 10
    assert tcp_piece_bytes({"PDSERVE_DISAGGREGATION_TCP_PIECE_KB": " 2048 "}) == 2 << 20
    for bad in ("big", "63", "-1"):
        with pytest.raises(ValueError, match="PDSERVE_DISAGGREGATION_TCP_PIECE_KB"):
            tcp_piece_bytes({"PDSERVE_DISAGGREGATION_TCP_PIECE_KB": bad})
