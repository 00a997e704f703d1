"""Enums shared across layers (config, messages, engine, disagg): the bottom of the import graph."""

from __future__ import annotations

import enum


class StrEnum(str, enum.Enum):
    """An enum whose members are their string values: `DType.AUTO == "auto"`, it formats,
    hashes and JSON-encodes (msgspec, json, FastAPI) as the value, so settings read from
    JSON or the command line compare and serialize as before (Python 3.10 has no StrEnum)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    __hash__ = str.__hash__


class DType(StrEnum):
    """`--dtype`: the weight and activation dtype."""

    AUTO = "auto"  # bfloat16 where the CPU computes it natively, else float32
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class DisaggregationMode(StrEnum):
    """`--disaggregation-mode`: which side of PD disaggregation this server runs."""

    NULL = "null"  # no disaggregation: prefill and decode in one server
    PREFILL = "prefill"  # runs the prompt, ships the KV cache and the first token
    DECODE = "decode"  # receives the KV cache and generates from the first token


class TransferBackend(StrEnum):
    """`--disaggregation-transfer-backend`: how KV pages move from prefill to decode
    (implementations: pdserve/disagg/transfer/registry.py)."""

    FAKE = "fake"
    TCP = "tcp"  # default; any two hosts
    SHM = "shm"  # prefill and decode on the same host
    NIXL = "nixl"  # NIXL (UCX) one-sided writes; optional extra pdserve[nixl]
    MOONCAKE = "mooncake"  # Mooncake TransferEngine one-sided writes; optional extra pdserve[mooncake]
    GLOO = "gloo"  # torch.distributed send/recv (CPU pools)
    NCCL = "nccl"  # the same with CUDA pools (GPUs only)

    @classmethod
    def from_name(cls, name: str) -> TransferBackend:
        try:
            return cls(name.lower())
        except ValueError:
            raise ValueError(f"unknown KV transfer backend {name!r}; choose one of {[b.value for b in cls]}") from None


class AttentionBackend(StrEnum):
    """`--attention-backend` (SGLang's flag): the paged attention implementation."""

    AUTO = "auto"  # cpu_paged for float32 on a CPU where its kernel builds, else torch_native
    TORCH_NATIVE = "torch_native"  # pdserve/model/attention.py; CPU and GPU
    CPU_PAGED = "cpu_paged"  # C++ decode kernel reading the paged pool in place (attention_backends.py)
    FAKE = "fake"  # writes the KV, attends to nothing (tests of the plumbing around attention)


class Quantization(StrEnum):
    """`--quantization` (SGLang's flag): how the decoder layers' linear weights are stored."""

    NONE = "none"  # the model dtype
    # int8 weights (symmetric, per output channel) and int8 activations quantized per row at
    # run time; int32 accumulation (pdserve/model/linears.py: int8_linear)
    W8A8_INT8 = "w8a8_int8"


class PrefixCacheKind(StrEnum):
    """The prefix cache (`--disable-radix-cache` selects `none`)."""

    RADIX = "radix"  # engine/radix_cache.py
    NONE = "none"  # engine/prefix_cache.py: NoCache, keeps nothing
