"""Structured output: grammar-constrained decoding with xgrammar (docs/api.md).

A request with `json_schema`, `regex` or `ebnf` in its sampling params gets a
GrammarMatcher in the scheduler process. Each step the runner asks it for the bitmask
of allowed next tokens and sets every other logit to -inf before sampling, so the
output is valid by construction; the scheduler advances it with every token it
accepts (`ReqGrammar.sync`, replaying output ids, so PD decode continues from the
first token prefill sampled under the same grammar) and finishes the request with
reason "stop" when the grammar terminates.

Requests without a grammar never touch this module (xgrammar is imported lazily).
Compiled grammars are cached per scheduler process (xgrammar's compiler cache), so a
repeated schema costs nothing after its first compile (~5 ms for a small JSON schema
here); the front end only parses the spec to reject a bad one with a 400.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

# OpenAI response_format {"type": "json_object"}: any JSON object
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def _xgr():
    import xgrammar

    return xgrammar


def _clean(e: BaseException) -> str:
    """xgrammar's message without its "[hh:mm:ss] /project/cpp/file.cc:123: " prefix."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[-1])[:300]


@functools.lru_cache(maxsize=256)
def validate_spec(kind: str, spec: str) -> None:
    """Front end: parse the grammar (no tokenizer needed); ValueError naming the key."""
    xgr = _xgr()
    parse = {
        "json_schema": xgr.Grammar.from_json_schema,
        "regex": xgr.Grammar.from_regex,
        "ebnf": xgr.Grammar.from_ebnf,
    }.get(kind)
    if parse is None:
        raise ValueError(f"unknown grammar kind {kind!r}")
    try:
        if kind == "json_schema":
            json.loads(spec)
        parse(spec)
    except ValueError as e:
        raise ValueError(f"invalid {kind}: {e}") from None
    except Exception as e:  # xgrammar raises RuntimeError for parse errors
        raise ValueError(f"invalid {kind}: {_clean(e)}") from None


class GrammarBackend:
    """One per scheduler process: tokenizer info + compiler (with its cache), built on
    the first request that uses a grammar."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler = None

    @property
    def compiler(self):
        if self._compiler is None:
            xgr = _xgr()
            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        return self._compiler

    def compile(self, kind: str, spec: str):
        c = self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(spec, any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "ebnf":
            return c.compile_grammar(spec)
        raise ValueError(f"unknown grammar kind {kind!r}")

    def new_state(self, kind: str, spec: str) -> "ReqGrammar":
        """ValueError if the grammar does not compile."""
        try:
            compiled = self.compile(kind, spec)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"invalid {kind}: {_clean(e)}") from None
        return ReqGrammar(_xgr().GrammarMatcher(compiled))


class ReqGrammar:
    """A request's matcher and how many of its output tokens it has accepted."""

    __slots__ = ("matcher", "accepted", "failed")

    def __init__(self, matcher) -> None:
        self.matcher = matcher
        self.accepted = 0
        self.failed = False

    def sync(self, output_ids: list[int]) -> bool:
        """Advance over output tokens not yet accepted; False if the grammar rejected one."""
        while self.accepted < len(output_ids) and not self.failed:
            if self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(output_ids[self.accepted]):
                self.failed = True
                break
            self.accepted += 1
        return not self.failed

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def apply_grammar_masks(logits: torch.Tensor, reqs: Sequence) -> None:
    """In place: -inf on every token the request's grammar does not allow next.
    `reqs[i]` owns row i; rows of requests without a grammar are untouched."""
    rows = [
        i for i, r in enumerate(reqs) if r.grammar is not None and not r.grammar.failed and not r.grammar.terminated
    ]
    if not rows:
        return
    xgr = _xgr()
    vocab = logits.shape[-1]
    bm = xgr.allocate_token_bitmask(len(rows), vocab)
    for j, i in enumerate(rows):
        g = reqs[i].grammar
        g.sync(reqs[i].output_ids)
        g.matcher.fill_next_token_bitmask(bm, j)
    # bit b of int32 word w allows token 32 * w + b (little-endian bytes: numpy unpacks
    # them in that order). numpy, single-threaded: small torch ops on all cores cost
    # 10-1000x more on a busy machine (thread wake-ups).
    bits = np.unpackbits(bm.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
    banned = torch.from_numpy(bits == 0)
    for j, i in enumerate(rows):
        logits[i].masked_fill_(banned[j], float("-inf"))
