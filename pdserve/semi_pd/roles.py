"""Which worker asks: the two roles of Semi-PD."""

from __future__ import annotations

import enum


class InstanceRole(enum.IntEnum):
    """A worker's role. Stored as one byte per KV block in the unified pool (0 = free)."""

    PREFILL = 1
    DECODE = 2

    @classmethod
    def of(cls, value: "InstanceRole | str | int") -> "InstanceRole":
        """The role from a member, its name ("prefill", any case) or its value; ValueError otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(f"role must be InstanceRole.PREFILL or InstanceRole.DECODE, got {value!r}")
