"""Greedy agreement of pdserve with `transformers` on the same weights: the figure behind
"which dtype / weight precision should I serve with" (benchmarks/bench_agreement.py) and
behind the default-dtype correctness test (tests/e2e/test_bf16_agreement.py).

Agreement of one prompt = the number of leading generated tokens that are equal; a prompt
agrees fully when that covers the whole reference (its EOS included, or all `n` tokens).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

# Short chat questions of mixed kinds (facts, arithmetic, code, lists, translation, creative).
CHAT_QUESTIONS: tuple[str, ...] = (
    "What is the capital of France?",
    "List the planets of the solar system.",
    "What is 12 times 7?",
    "Write a haiku about autumn leaves.",
    "Who wrote Romeo and Juliet?",
    "Explain what a black hole is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Give me three tips for better sleep.",
    "What is the boiling point of water in Celsius?",
    "Write a Python function that reverses a string.",
    "What is the largest ocean on Earth?",
    "Name a primary color.",
    "Summarize the plot of Cinderella in two sentences.",
    "Is a tomato a fruit or a vegetable?",
    "What does CPU stand for?",
    "How many days are there in a leap year?",
    "Suggest a name for a pet goldfish.",
    "What is photosynthesis?",
    "Tell me a joke about computers.",
    "What is the square root of 81?",
)


def chat_prompts(tokenizer, questions: Sequence[str] = CHAT_QUESTIONS) -> list[list[int]]:
    """Token ids of each question through the model's chat template (as the chat route sends)."""
    out = []
    for q in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def _transformers_model(dtype: str, model_path: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    from pdserve.model.paths import resolve_model_path

    path = resolve_model_path(model_path)
    kw = {"dtype": getattr(torch, dtype)}
    if path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), **kw)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, **kw)
    return hf.eval()


def transformers_first_token_logprobs(
    prompt: list[int], dtype: str, k: int, model_path: str | None = None
) -> list[tuple[int, float]]:
    """The k most likely first tokens after `prompt` by `transformers` on the same weights, with
    their log-probabilities, most likely first: how near a tie the greedy first token is."""
    import torch

    hf = _transformers_model(dtype, model_path)
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0, -1].float()
    top = torch.log_softmax(logits, dim=-1).topk(k)
    return list(zip(top.indices.tolist(), top.values.tolist()))


def transformers_greedy(
    prompts: Sequence[list[int]], dtype: str, max_new_tokens: int, model_path: str | None = None
) -> list[list[int]]:
    """Greedy continuations from `transformers` on the same weights (GGUF or HF directory)."""
    import torch

    hf = _transformers_model(dtype, model_path)
    eos = hf.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            g = hf.generate(
                torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
            refs.append(g[0, len(ids) :].tolist())
    return refs


def leading_equal(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Agreement:
    prefix: list[int]  # leading equal tokens, per prompt
    full: list[bool]  # the whole reference reproduced, per prompt

    @property
    def first_token(self) -> int:
        return sum(p > 0 for p in self.prefix)

    @property
    def num_full(self) -> int:
        return sum(self.full)

    def as_dict(self) -> dict:
        n = len(self.prefix)
        return {
            "prompts": n,
            "first_token_equal": self.first_token,
            "all_tokens_equal": self.num_full,
            "all_tokens_equal_pct": round(100 * self.num_full / n, 1),
            "mean_leading_equal": round(sum(self.prefix) / n, 2),
            "leading_equal": self.prefix,
        }


def agreement(outputs: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> Agreement:
    prefix = [leading_equal(o, r) for o, r in zip(outputs, refs)]
    return Agreement(prefix, [p >= len(r) for p, r in zip(prefix, refs)])
