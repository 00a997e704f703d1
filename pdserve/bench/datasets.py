"""Workloads: the prompts a benchmark sends, with their token counts.

Every workload yields a list of `BenchRequest`. Lengths are counted with the served
model's tokenizer (anything with `encode`/`decode`/`vocab_size`, see `Tokenizer`),
so "256 input tokens" means 256 tokens of the model under test.

- `random`: random token ids decoded to text; input and output lengths drawn
  uniformly from `[len * range_ratio, len]` (SGLang's `bench_serving` semantics:
  ratio 1.0 = fixed lengths, 0.0 = anywhere in [1, len]).
- `shared-prefix`: groups of prompts that share a long "system prompt" prefix
  (SGLang's `generated-shared-prefix`), shuffled so the groups interleave.
- `mixed`: short prompts with a share of long ones mixed in at random positions,
  the case where a long prefill interrupts ongoing decodes.
- `jsonl`: the user's own prompts, one JSON object per line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

DATASET_NAMES = ("random", "shared-prefix", "mixed", "jsonl")
# SGLang's name for the shared-prefix workload.
DATASET_ALIASES = {"generated-shared-prefix": "shared-prefix"}


class Tokenizer(Protocol):
    """What the benchmark needs from a tokenizer (a `transformers` one fits)."""

    vocab_size: int
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send: its text, its length in tokens and how many to generate."""

    prompt: str
    prompt_len: int  # tokens of `prompt` under the served model's tokenizer
    output_len: int  # max_new_tokens / max_tokens asked for
    kind: str = ""  # workload-specific tag ("long"/"short" for mixed, group id, ...)


@dataclass(frozen=True)
class RandomSpec:
    input_len: int = 1024
    output_len: int = 1024
    range_ratio: float = 0.0


@dataclass(frozen=True)
class SharedPrefixSpec:
    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256


@dataclass(frozen=True)
class MixedSpec:
    short: RandomSpec = RandomSpec()
    long_input_len: int = 2048
    long_fraction: float = 0.1


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Tokens in `text` without special tokens (BOS etc. are the server's business)."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def _sample_len(rng: random.Random, length: int, range_ratio: float) -> int:
    low = max(1, int(length * range_ratio))
    return rng.randint(low, max(low, length))


def _normal_ids(tokenizer: Tokenizer) -> list[int]:
    special = set(tokenizer.all_special_ids or [])
    ids = [i for i in range(tokenizer.vocab_size) if i not in special]
    if not ids:
        raise ValueError("the tokenizer has no non-special tokens")
    return ids


def random_text(tokenizer: Tokenizer, num_tokens: int, rng: random.Random, pool: list[int]) -> tuple[str, int]:
    """Text of random tokens that re-encodes to `num_tokens` tokens where possible.

    Decoding random ids and encoding the text again can merge or split tokens, so the
    ids are re-encoded, trimmed or padded a few times until the count holds. Returns
    the text and its true token count.
    """
    ids = [rng.choice(pool) for _ in range(num_tokens)]
    text = tokenizer.decode(ids)
    for _ in range(8):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == num_tokens:
            break
        if len(ids) > num_tokens:
            ids = ids[:num_tokens]
        else:
            ids = ids + [rng.choice(pool) for _ in range(num_tokens - len(ids))]
        text = tokenizer.decode(ids)
    return text, count_tokens(tokenizer, text)


def random_requests(tokenizer: Tokenizer, num_prompts: int, spec: RandomSpec, seed: int) -> list[BenchRequest]:
    """`num_prompts` prompts of random tokens (SGLang's `random` workload)."""
    _check_positive(input_len=spec.input_len, output_len=spec.output_len, num_prompts=num_prompts)
    if not 0.0 <= spec.range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {spec.range_ratio}")
    rng = random.Random(seed)
    pool = _normal_ids(tokenizer)
    out = []
    for _ in range(num_prompts):
        in_len = _sample_len(rng, spec.input_len, spec.range_ratio)
        out_len = _sample_len(rng, spec.output_len, spec.range_ratio)
        text, n = random_text(tokenizer, in_len, rng, pool)
        out.append(BenchRequest(text, n, out_len, "random"))
    return out


def shared_prefix_requests(tokenizer: Tokenizer, spec: SharedPrefixSpec, seed: int) -> list[BenchRequest]:
    """`num_groups * prompts_per_group` prompts; those of a group share a long prefix."""
    _check_positive(
        gsp_num_groups=spec.num_groups,
        gsp_prompts_per_group=spec.prompts_per_group,
        gsp_system_prompt_len=spec.system_prompt_len,
        gsp_question_len=spec.question_len,
        gsp_output_len=spec.output_len,
    )
    rng = random.Random(seed)
    pool = _normal_ids(tokenizer)
    out = []
    for g in range(spec.num_groups):
        prefix, _ = random_text(tokenizer, spec.system_prompt_len, rng, pool)
        for _ in range(spec.prompts_per_group):
            question, _ = random_text(tokenizer, spec.question_len, rng, pool)
            text = prefix + "\n" + question
            out.append(BenchRequest(text, count_tokens(tokenizer, text), spec.output_len, f"group{g}"))
    rng.shuffle(out)
    return out


def mixed_requests(tokenizer: Tokenizer, num_prompts: int, spec: MixedSpec, seed: int) -> list[BenchRequest]:
    """Short prompts with `round(long_fraction * num_prompts)` long ones at random places."""
    if not 0.0 <= spec.long_fraction <= 1.0:
        raise ValueError(f"--mixed-long-fraction must be in [0, 1], got {spec.long_fraction}")
    _check_positive(mixed_long_input_len=spec.long_input_len, num_prompts=num_prompts)
    rng = random.Random(seed)
    pool = _normal_ids(tokenizer)
    n_long = round(spec.long_fraction * num_prompts)
    long_at = set(rng.sample(range(num_prompts), n_long))
    short = random_requests(tokenizer, num_prompts, spec.short, seed + 1)
    out = []
    for i, req in enumerate(short):
        if i in long_at:
            text, n = random_text(tokenizer, spec.long_input_len, rng, pool)
            out.append(BenchRequest(text, n, req.output_len, "long"))
        else:
            out.append(BenchRequest(req.prompt, req.prompt_len, req.output_len, "short"))
    return out


def jsonl_requests(
    tokenizer: Tokenizer, path: str, num_prompts: int | None, default_output_len: int
) -> list[BenchRequest]:
    """Prompts from a JSONL file: one object per line with `prompt` (or `text`) and
    optionally `output_len` (or `max_tokens`). The first `num_prompts` lines are used
    (all of them when `num_prompts` is None)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            prompt = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'prompt'")
            out_len = obj.get("output_len", obj.get("max_tokens", default_output_len))
            if not isinstance(out_len, int) or out_len < 1:
                raise ValueError(f"{path}:{lineno}: 'output_len' must be a positive integer")
            out.append(BenchRequest(prompt, count_tokens(tokenizer, prompt), out_len, "jsonl"))
            if num_prompts is not None and len(out) >= num_prompts:
                break
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
