"""Sampling parameters (SGLang's names) with validation that names the field."""

from __future__ import annotations

import msgspec

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


class SamplingParams(msgspec.Struct, kw_only=True):
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalty(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def verify(self, vocab_size: int) -> None:
        """Raises ValueError naming the offending field."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"sampling_params.{name} {why}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad("max_new_tokens", f"must be a non-negative integer, got {self.max_new_tokens!r}")
        if not (0.0 <= self.temperature <= 100.0):
            bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and not (1 <= self.top_k):
            bad("top_k", f"must be -1 (disabled) or >= 1, got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"has {len(self.stop)} strings; at most {MAX_STOP_STRINGS}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            bad("stop", "must contain non-empty strings")
        if any(not (0 <= t < vocab_size) for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be token ids in [0, {vocab_size})")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            bad("seed", "must be in [0, 2^63)")
        if not (1 <= self.n <= 64):
            bad("n", f"must be in [1, 64], got {self.n}")
