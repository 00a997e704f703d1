"""One engine step's contract between the scheduler and the runner: the plan the scheduler
hands out (`Plan` of `ScheduledItem`s), what the runner returns for it (`RunOutput`), and the
scheduler's counters and answers (`SchedulerStats`, `Prealloc`). Data only, no policy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pdserve.engine.request import Req


@dataclass
class ScheduledItem:
    req: Req
    start: int  # position (in fill_ids) of the first token computed
    n: int  # tokens computed
    sample: bool  # the chunk reaches the end of fill_ids: sample the next token
    # prompt positions start.. of this chunk whose next-token logprob the request wants
    # (return_logprob, first pass over the prompt): logits rows after the sampled ones
    num_input_logprobs: int = 0


@dataclass
class Plan:
    items: list[ScheduledItem]  # decode items first (num_decode of them), then extends
    num_decode: int

    @property
    def num_tokens(self) -> int:
        return sum(i.n for i in self.items)


@dataclass
class RunOutput:
    next_ids: list[int]  # one per sampled item, in plan order
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # plan item index -> logprob of each next *input* token of that chunk (return_logprob)
    input_logprobs: dict[int, list[float]] | None = None


@dataclass
class SchedulerStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_retractions: int = 0
    finished: int = 0
    aborted: int = 0
    steps: int = 0
    prefill_computed_tokens: int = 0  # prompt tokens run through the model


class Prealloc(enum.Enum):
    """Answer of `Scheduler.preallocate` (PD decode, pages for a KV transfer)."""

    OK = "ok"  # pages reserved in req.pages
    RESUME_FIRST = "resume_first"  # retracted requests wait in the scheduler: they go first
    NO_BUDGET = "no_budget"  # not enough pages now (requests queued behind wait too: FIFO)
