"""Every message between the HTTP front end and the scheduler process.

msgspec Structs, tagged, encoded with msgpack (never pickle). One module so that
both sides agree on one definition.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from pdserve.sampling_params import SamplingParams
from pdserve.enums import DisaggregationMode, StrEnum


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
    message: str = "aborted by the client"


# ---- control calls: one request type per call, each answered by its own reply type -----
class FlushCacheReq(msgspec.Struct, tag=True):
    call_id: int


class GetLoadReq(msgspec.Struct, tag=True):
    call_id: int


class ShutdownReq(msgspec.Struct, tag=True):
    call_id: int


class ProfileReq(msgspec.Struct, tag=True):
    """/start_profile (start=True) and /stop_profile (pdserve/engine/profiler.py)."""

    call_id: int
    start: bool
    output_dir: str | None = None
    num_steps: int | None = None
    record_shapes: bool = False
    with_stack: bool = False


class FinishReasonType(StrEnum):
    """Why a request ended; compares equal to its value ("stop" == FinishReasonType.STOP)."""

    STOP = "stop"  # EOS, a stop token or string, or the grammar terminated
    LENGTH = "length"  # max_new_tokens, the context length or the KV pool
    ABORT = "abort"  # the client, an error, or a rejected request (status_code says which)


class FinishReason(msgspec.Struct):
    type: FinishReasonType
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


class SchedulerLoad(msgspec.Struct):
    """What the scheduler holds now, and its counters since startup (after warm-up)."""

    num_running_reqs: int
    num_waiting_reqs: int
    num_tokens: int  # KV tokens of the running requests
    num_used_pages: int  # held by requests (not free, not merely cached)
    num_free_pages: int
    num_cached_pages: int  # held only by the prefix cache (evictable)
    num_total_pages: int
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_retractions: int = 0
    cache_hit_tokens: int = 0
    cache_query_tokens: int = 0
    prefill_computed_tokens: int = 0  # prompt tokens run through the model (not from a cache)


class BatchOut(msgspec.Struct, tag=True):
    outs: list[ReqOut]


class SemiPDStatusReq(msgspec.Struct, tag=True):
    """Semi-PD resident: its status (GET /semi_pd/status)."""

    call_id: int


class SemiPDReallocateReq(msgspec.Struct, tag=True):
    """Semi-PD resident: move the compute split (POST /semi_pd/reallocate)."""

    call_id: int
    prefill_percentage: int
    decode_percentage: int


class SemiPDResp(msgspec.Struct, tag=True):
    call_id: int
    ok: bool
    status: dict[str, Any] = {}  # JSON-like: the coordinator status
    error: str | None = None


class FlushCacheResp(msgspec.Struct, tag=True):
    call_id: int
    success: bool  # False: requests are running or waiting


class PrefillQueueStats(msgspec.Struct):
    bootstrap_queue_len: int
    inflight_queue_len: int
    parked_reqs: int = 0  # ended, pages freed once a KV write reading them ends


class KVStoreStats(msgspec.Struct):
    """A server's use of the KV cache data service (`--kv-store`), counters since startup."""

    kv_store_query_tokens: int = 0  # prompt tokens looked up beyond the local prefix cache
    kv_store_hit_tokens: int = 0  # of them, loaded from the store instead of computed
    kv_store_bytes_read: int = 0  # record bytes fetched
    kv_store_bytes_written: int = 0  # record bytes written
    kv_store_fetches: int = 0  # lookups that finished (hit or miss)
    kv_store_fetch_seconds: float = 0.0  # their total latency (lookup + fetch + checks)
    kv_store_writes: int = 0  # write batches sent
    kv_store_write_seconds: float = 0.0
    kv_store_pending_write_bytes: int = 0  # copied out of the pool, not yet written
    kv_store_errors: int = 0  # calls that failed or timed out (each one a miss)
    kv_store_timeouts: int = 0  # lookups given up on: the prefix was computed instead
    kv_store_rejected_pages: int = 0  # records refused (corrupt, wrong key or layout)
    kv_store_dropped_writes: int = 0  # pages not written (store down or the write queue full)


class DecodeQueueStats(msgspec.Struct):
    prealloc_queue_len: int
    transfer_queue_len: int
    parked_reqs: int  # ended, pages freed once a KV write under way ends
    num_failed_transfers: int
    avg_transfer_latency_s: float
    kv_transfers_completed: int
    kv_transfers_failed: int
    kv_bytes_transferred: int
    kv_transfer_mean_latency_s: float
    kv_transfer_gbps: float


class LoadResp(msgspec.Struct, tag=True):
    call_id: int
    load: SchedulerLoad
    disaggregation_mode: DisaggregationMode
    prefill: PrefillQueueStats | None = None  # PD prefill server
    decode: DecodeQueueStats | None = None  # PD decode server
    kv_store: KVStoreStats | None = None  # a server started with --kv-store

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON of /get_load."""
        out = msgspec.structs.asdict(self.load)
        out["disaggregation_mode"] = self.disaggregation_mode.value
        for part in (self.prefill, self.decode, self.kv_store):
            if part is not None:
                out.update(msgspec.structs.asdict(part))
        return out


class ShutdownResp(msgspec.Struct, tag=True):
    call_id: int


class ProfileResp(msgspec.Struct, tag=True):
    call_id: int
    success: bool
    message: str
    trace_path: str | None = None  # where the trace goes (start) or went (stop)


class ServerInfo(msgspec.Struct, tag=True):
    """Sent once the scheduler is ready (the front end waits for it)."""

    max_total_num_tokens: int
    page_size: int
    context_length: int
    vocab_size: int
    dtype: str
    num_layers: int
    arch: str
    weight_bytes: int
    load_seconds: float
    max_running_requests: int
    chunked_prefill_size: int
    disable_radix_cache: bool
    tp_size: int


class StartupError(msgspec.Struct, tag=True):
    """Sent instead of ServerInfo when the scheduler could not start."""

    message: str


# ---- weights and memory (RL: issue #15); SGLang's endpoint fields ------------------------
class InitWeightsGroupReq(msgspec.Struct, tag=True):
    """Join a trainer's collective group (the trainer is rank 0; this engine's rank is
    rank_offset + its tensor-parallel rank)."""

    call_id: int
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str


class DestroyWeightsGroupReq(msgspec.Struct, tag=True):
    call_id: int
    group_name: str


class UpdateWeightsFromDistributedReq(msgspec.Struct, tag=True):
    """Receive tensors broadcast by the group's rank 0, one per name, or all in one flat
    uint8 bucket when load_format == "flattened_bucket" (tensors' bytes back to back in the
    order of `names`)."""

    call_id: int
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str
    flush_cache: bool = True
    abort_all_requests: bool = False
    load_format: str | None = None


class UpdateWeightsFromTensorReq(msgspec.Struct, tag=True):
    """Named tensors as safetensors files' bytes (never pickle): one per tensor-parallel
    rank, or one for all ranks. Each holds the whole model's tensors; each rank cuts its shard."""

    call_id: int
    safetensors: list[bytes]
    flush_cache: bool = True
    abort_all_requests: bool = False


class UpdateWeightsFromDiskReq(msgspec.Struct, tag=True):
    call_id: int
    model_path: str
    flush_cache: bool = True
    abort_all_requests: bool = False


class GetWeightsByNameReq(msgspec.Struct, tag=True):
    call_id: int
    name: str
    truncate_size: int = 100


class ReleaseMemoryReq(msgspec.Struct, tag=True):
    call_id: int
    tags: list[str] | None = None


class ResumeMemoryReq(msgspec.Struct, tag=True):
    call_id: int
    tags: list[str] | None = None


class PauseGenerationReq(msgspec.Struct, tag=True):
    call_id: int


class ContinueGenerationReq(msgspec.Struct, tag=True):
    call_id: int


class AdminResp(msgspec.Struct, tag=True):
    """The reply to each weights / memory / pause call: success, a message for the client
    (the HTTP status when it failed) and the call's result, if any."""

    call_id: int
    success: bool
    message: str = ""
    status_code: int = 200
    data: Any = None


WeightsReq = Union[
    InitWeightsGroupReq,
    DestroyWeightsGroupReq,
    UpdateWeightsFromDistributedReq,
    UpdateWeightsFromTensorReq,
    UpdateWeightsFromDiskReq,
    GetWeightsByNameReq,
    ReleaseMemoryReq,
    ResumeMemoryReq,
    PauseGenerationReq,
    ContinueGenerationReq,
]


ControlReq = Union[FlushCacheReq, GetLoadReq, ShutdownReq, ProfileReq, WeightsReq, SemiPDStatusReq, SemiPDReallocateReq]
ControlResp = Union[FlushCacheResp, LoadResp, ShutdownResp, ProfileResp, AdminResp, SemiPDResp]
ToScheduler = Union[
    GenerateReq,
    AbortReq,
    FlushCacheReq,
    GetLoadReq,
    ShutdownReq,
    ProfileReq,
    WeightsReq,
    SemiPDStatusReq,
    SemiPDReallocateReq,
]
FromScheduler = Union[
    BatchOut, FlushCacheResp, LoadResp, ShutdownResp, ProfileResp, AdminResp, SemiPDResp, ServerInfo, StartupError
]

_enc = msgspec.msgpack.Encoder()
_dec_to = msgspec.msgpack.Decoder(ToScheduler)
_dec_from = msgspec.msgpack.Decoder(FromScheduler)


def encode(msg: msgspec.Struct) -> bytes:
    return _enc.encode(msg)


def decode_to_scheduler(data: bytes) -> ToScheduler:
    return _dec_to.decode(data)


def decode_from_scheduler(data: bytes) -> FromScheduler:
    return _dec_from.decode(data)
