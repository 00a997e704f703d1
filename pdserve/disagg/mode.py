"""Which side of PD disaggregation this server runs (`--disaggregation-mode`)."""

from __future__ import annotations

from enum import Enum


class DisaggregationMode(Enum):
    NULL = "null"  # no disaggregation: prefill and decode in one server
    PREFILL = "prefill"  # runs the prompt, ships the KV cache and the first token
    DECODE = "decode"  # receives the KV cache and generates from the first token
