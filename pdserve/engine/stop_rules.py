"""When a request stops: the rules checked after each new output token (grammar, EOS, stop
token ids, max_new_tokens, the context length, stop strings)."""

from __future__ import annotations

from typing import Callable

from pdserve.engine.request import Req
from pdserve.messages import FinishReason, FinishReasonType


class StopRules:
    def __init__(self, eos_ids: set[int], context_length: int, detokenize: Callable[[list[int]], str] | None) -> None:
        self.eos_ids = eos_ids
        self.context_length = context_length
        self.detokenize = detokenize  # stop strings are matched on text (None: not supported)

    def check(self, req: Req, tok: int) -> FinishReason | None:
        """Why `req` stops after its new output token `tok`, or None to go on."""
        sp = req.sampling
        if req.grammar is not None:  # advance the matcher over the new output token(s)
            if not req.grammar.sync(req.output_ids):
                return FinishReason(
                    FinishReasonType.ABORT,
                    status_code=500,
                    message=f"token {tok} is not allowed by the request's grammar",
                )
            if req.grammar.terminated:
                return FinishReason(FinishReasonType.STOP, matched=tok if tok in self.eos_ids else None)
        if not sp.ignore_eos and tok in self.eos_ids:
            return FinishReason(FinishReasonType.STOP, matched=tok)
        if tok in sp.stop_token_ids:
            return FinishReason(FinishReasonType.STOP, matched=tok)
        if len(req.output_ids) >= sp.max_new_tokens:
            return FinishReason(FinishReasonType.LENGTH, matched=None)
        if req.fill_len >= self.context_length:
            return FinishReason(FinishReasonType.LENGTH, message="context length reached")
        if sp.stop and self.detokenize is not None:
            longest = max(len(stop) for stop in sp.stop)
            tail = self.detokenize(req.output_ids[-(longest + 8) :])
            for stop in sp.stop:
                if stop in tail:
                    return FinishReason(FinishReasonType.STOP, matched=stop)
        return None
