"""Every message between the HTTP front end and the scheduler process.

msgspec Structs, tagged, encoded with msgpack (never pickle). One module so that
both sides agree on one definition.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from pdserve.engine.sampling_params import SamplingParams


class GenerateReq(msgspec.Struct, tag=True):
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    arrival_time: float = 0.0
    # PD disaggregation (ignored in mode null)
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


class AbortReq(msgspec.Struct, tag=True):
    rid: str


class ControlReq(msgspec.Struct, tag=True):
    """Request/response calls: kind in {"flush_cache", "get_load", "server_info", "shutdown"}."""

    call_id: int
    kind: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)


class FinishReason(msgspec.Struct):
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None
    message: str | None = None
    status_code: int | None = None


class ReqOut(msgspec.Struct):
    rid: str
    new_ids: list[int]
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    finish: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    # phase timing in seconds, set on the finishing output
    queue_time: float | None = None
    prefill_time: float | None = None
    transfer_time: float | None = None
    decode_time: float | None = None
    input_logprobs: list[float | None] | None = None  # sent once, first entry None


class BatchOut(msgspec.Struct, tag=True):
    outs: list[ReqOut]


class ControlResp(msgspec.Struct, tag=True):
    call_id: int
    result: dict[str, Any]


ToScheduler = Union[GenerateReq, AbortReq, ControlReq]
FromScheduler = Union[BatchOut, ControlResp]

_enc = msgspec.msgpack.Encoder()
_dec_to = msgspec.msgpack.Decoder(ToScheduler)
_dec_from = msgspec.msgpack.Decoder(FromScheduler)


def encode(msg: msgspec.Struct) -> bytes:
    return _enc.encode(msg)


def decode_to_scheduler(data: bytes) -> ToScheduler:
    return _dec_to.decode(data)


def decode_from_scheduler(data: bytes) -> FromScheduler:
    return _dec_from.decode(data)
