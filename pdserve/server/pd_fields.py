"""The PD fields of a request (bootstrap_host, bootstrap_port, bootstrap_room), which the
PD router adds: read per generation, and required by a prefill or decode server."""

from __future__ import annotations

from pdserve.enums import DisaggregationMode
from pdserve.server.tokenizer_manager import TokenizerManager


def bootstrap_for(host, port, room, copy: int) -> tuple:
    """PD fields of one generation; the n copies of one prompt use rooms room + i
    (SGLang's rule), so they do not collide."""
    if room is not None:
        if isinstance(room, bool) or not isinstance(room, int):
            raise ValueError("bootstrap_room must be an integer")
        room += copy
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise ValueError("bootstrap_port must be an integer or null")
    if host is not None and not isinstance(host, str):
        raise ValueError("bootstrap_host must be a string")
    return host, port, room


def check_pd_fields(tm: TokenizerManager, boots: list[tuple]) -> None:
    """A prefill or decode server answers only the router's requests: alone it would prefill
    and stop, or wait for KV that never comes (SGLang answers them with garbage)."""
    mode = tm.args.disaggregation_mode
    if mode == DisaggregationMode.NULL:
        return
    if any(host is None or room is None for host, _, room in boots):
        raise ValueError(
            f"this is a PD {mode} server: send requests to the router in front of it "
            "(the `pdserve launch` endpoint, or `pdserve router --pd-disaggregation`), "
            "which adds bootstrap_host, bootstrap_port and bootstrap_room"
        )
