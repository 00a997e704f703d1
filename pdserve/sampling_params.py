"""Sampling parameters (SGLang's names) with validation that names the field."""

from __future__ import annotations

import msgspec

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
GRAMMAR_KEYS = ("json_schema", "regex", "ebnf")  # structured output (pdserve/engine/grammar.py)


class FieldError(ValueError):
    """A bad request field; `param` is the field as the client named it (OpenAI's
    error.param). The HTTP layer answers 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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
    # structured output: at most one of these (SGLang's keys); json_schema is a JSON string
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    # token id -> added to its logit before sampling (OpenAI's logit_bias), in [-100, 100]
    logit_bias: dict[int, float] | None = None

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, spec) of the structured-output constraint, or None."""
        for k in GRAMMAR_KEYS:
            v = getattr(self, k)
            if v is not None:
                return k, v
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalty(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def verify(self, vocab_size: int, prefix: str = "sampling_params.", names: dict[str, str] | None = None) -> None:
        """Raises ValueError naming the offending field: `prefix` + its name, or the name
        the client used (`names`: field -> request key, e.g. max_new_tokens -> max_tokens)."""

        def bad(name: str, why: str) -> None:
            field = f"{prefix}{(names or {}).get(name, name)}"
            raise FieldError(f"{field} {why}", field)

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
        given = [k for k in GRAMMAR_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            bad(given[1], f"cannot be combined with {given[0]}: give at most one of {', '.join(GRAMMAR_KEYS)}")
        for k in given:
            if not isinstance(getattr(self, k), str) or not getattr(self, k):
                bad(k, "must be a non-empty string")
        if self.logit_bias is not None:
            for t, b in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, int) or not (0 <= t < vocab_size):
                    bad("logit_bias", f"keys must be token ids in [0, {vocab_size}), got {t!r}")
                if not (-100.0 <= b <= 100.0):
                    bad("logit_bias", f"values must be in [-100, 100], got {b} for token {t}")
