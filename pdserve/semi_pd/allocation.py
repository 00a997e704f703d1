"""SMAllocation: how the machine's compute is split between prefill and decode."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SMAllocation:
    """Percentages of the machine's compute (GPU: SMs under MPS; CPU: cores and CFS quota,
    docs/semi_pd.md). Each share is 1..100 and together they are at most 100."""

    prefill_percentage: int
    decode_percentage: int

    def __post_init__(self) -> None:
        for name in ("prefill_percentage", "decode_percentage"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not (1 <= v <= 100):
                raise ValueError(f"{name} must be an integer percentage in 1..100, got {v!r}")
        if self.total > 100:
            raise ValueError(
                f"prefill_percentage {self.prefill_percentage} + decode_percentage "
                f"{self.decode_percentage} = {self.total} %, over 100 %"
            )

    @property
    def total(self) -> int:
        return self.prefill_percentage + self.decode_percentage

    def __str__(self) -> str:
        return f"{self.prefill_percentage}/{self.decode_percentage}"

    def as_dict(self) -> dict[str, int]:
        return {"prefill_percentage": self.prefill_percentage, "decode_percentage": self.decode_percentage}
