"""Scheduler-side request state."""

from __future__ import annotations

import enum
import time

import torch

from pdserve.sampling_params import SamplingParams
from pdserve.messages import FinishReason, FinishReasonType, ReqOut


class ReqStatus(enum.IntEnum):
    """Where a request is; the one source of truth for "finished". Finished states come
    last and carry the reason's type (the details are in `Req.finish_reason`)."""

    WAITING = 0  # in the scheduler's waiting queue (new or retracted), or PD prefill bootstrapping
    RUNNING = 1  # admitted: prefilling (possibly chunked) or decoding
    WAITING_FOR_KV = 2  # PD decode: bootstrapping, pages reserved, KV in flight
    SENDING_KV = 3  # PD prefill: generation ended, pages held until the KV is sent
    FINISHED_STOP = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORT = 6

    @property
    def is_finished(self) -> bool:
        return self >= ReqStatus.FINISHED_STOP

    @staticmethod
    def finished(reason: FinishReason) -> ReqStatus:
        return _FINISHED[reason.type]


class Req:
    def __init__(
        self,
        rid: str,
        input_ids: list[int],
        sampling: SamplingParams,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.rid = rid
        self.origin_input_ids = input_ids
        self.output_ids: list[int] = []
        self.sampling = sampling
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        self.status = ReqStatus.WAITING
        self.pages: list[int] = []  # KV pages; the first prefix_len // page_size are the cache's
        self.kv_len = 0  # tokens of fill_ids whose KV is in `pages`
        self.prefix_len = 0  # tokens borrowed from the prefix cache
        self.prefix_node = None  # locked radix node
        self.cached_tokens = 0  # reported to the client (first admission): prefix cache + KV store
        self.prefill_start = 0  # kv_len at admission (tokens not computed: cache and store hits)
        self.kv_fetch = None  # engine/kv_connector.py KVFetch: a KV store lookup, until admission
        self.store_pages = 0  # full prompt pages the KV store held at the lookup (not written again)
        # set with a FINISHED_* status, or (PD prefill) when generation ends in SENDING_KV
        self.finish_reason: FinishReason | None = None
        self.sent_len = 0  # output tokens already sent to the front end
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.input_logprobs: list[float] = []  # logprob of input token i+1 given tokens <= i
        self.input_logprobs_sent = False
        self.token_counts: dict[int, int] = {}  # for frequency/presence penalties
        # seeded sampling: the request's own random stream, across steps and retractions
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.grammar = None  # pdserve.engine.grammar.ReqGrammar: structured output
        self.arrival_time = arrival_time or time.time()
        self.admit_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        # PD: when the KV transfer ran (prefill: after its first token; decode: before it)
        self.transfer_start: float | None = None
        self.transfer_end: float | None = None
        self.num_retractions = 0
        # PD
        self.bootstrap_host: str | None = None
        self.bootstrap_port: int | None = None
        self.bootstrap_room: int | None = None
        self.kv_sender = None
        self.kv_receiver = None
        self.kv_sent_pages = 0  # prefill: pages already handed to kv_sender (a prefix, in order)
        self.bootstrap_start: float | None = None

    @property
    def transfer_time(self) -> float | None:
        if self.transfer_start is None or self.transfer_end is None:
            return None
        return self.transfer_end - self.transfer_start

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def is_decoding(self) -> bool:
        """Prefill done: the next step feeds the last output token."""
        return self.status == ReqStatus.RUNNING and self.kv_len == self.fill_len - 1 and bool(self.output_ids)

    @property
    def wants_input_logprobs(self) -> bool:
        """Input-token logprobs are computed on the first pass over the prompt only (a
        retracted request's prompt comes back from the prefix cache)."""
        return self.return_logprob and self.num_retractions == 0

    @property
    def finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish(self) -> FinishReason | None:
        """The reason, once the request is finished (what the client is told)."""
        return self.finish_reason if self.status.is_finished else None

    def take_out(self) -> ReqOut:
        """What the client has not been sent yet: new tokens (and logprobs), and once finished,
        the finish reason and the time spent queued, in prefill, in the KV transfer and decoding."""
        new = self.output_ids[self.sent_len :]
        lps = self.logprobs[self.sent_len :] if self.return_logprob else None
        tops = self.top_logprobs[self.sent_len :] if self.return_logprob and self.top_logprobs_num else None
        self.sent_len = len(self.output_ids)
        out = ReqOut(
            self.rid, new, lps, tops, self.finish, len(self.origin_input_ids), self.cached_tokens, len(self.output_ids)
        )
        if (
            self.return_logprob
            and not self.input_logprobs_sent
            and len(self.input_logprobs) >= len(self.origin_input_ids) - 1
        ):
            out.input_logprobs = [None] + self.input_logprobs[: len(self.origin_input_ids) - 1]
            self.input_logprobs_sent = True
        if self.finished:
            start = self.admit_time or self.finish_time
            first = self.first_token_time or self.finish_time
            out.queue_time = start - self.arrival_time
            # the part of the transfer before the first token (PD decode) is not prefill
            xfer = self.transfer_time
            inside = 0.0 if xfer is None else max(0.0, min(first, self.transfer_end) - max(start, self.transfer_start))
            out.prefill_time = first - start - inside
            out.transfer_time = xfer
            out.decode_time = self.finish_time - first
        return out

    def __repr__(self) -> str:
        return f"Req({self.rid}, in={len(self.origin_input_ids)}, out={len(self.output_ids)}, kv={self.kv_len})"


_FINISHED = {
    FinishReasonType.STOP: ReqStatus.FINISHED_STOP,
    FinishReasonType.LENGTH: ReqStatus.FINISHED_LENGTH,
    FinishReasonType.ABORT: ReqStatus.FINISHED_ABORT,
}
