"""Which side of PD disaggregation this server runs (`--disaggregation-mode`)."""

from __future__ import annotations

from pdserve.enums import DisaggregationMode

__all__ = ["DisaggregationMode"]
