"""One copy of the model's weights in shared memory for both Semi-PD workers.

The resident loads the model, writes its fused weights (`LlamaModel.named_weights()`) into one
POSIX shared-memory segment (`engine/shm_segment.py`) and sends each worker the
segment name and a manifest (name, byte offset, dtype, shape). A worker maps the segment and
hands the views to `LlamaModel.adopt_weights` — no copy. What is not shared: oneDNN's
prepacked copies the forward actually multiplies with (opaque tensors without a storage, so
each worker packs its own) and, in bf16, the 4-bit copies.
"""

from __future__ import annotations

import torch

from pdserve.engine.shm_segment import SegmentMaps, allocate_kv_buffer, new_shm_name

_ALIGN = 64
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_weights(weights: dict[str, torch.Tensor]) -> tuple[str, int, list[dict]]:
    """(segment name, its size in bytes, manifest): `weights` copied into a new segment,
    which this process owns (freed with `shm_segment.free_kv_buffer(name)` or at exit)."""
    manifest, off = [], 0
    for name, t in weights.items():
        if t.dtype not in _DTYPES.values():
            raise ValueError(f"weight {name}: dtype {t.dtype} cannot be shared")
        manifest.append(
            {"name": name, "offset": off, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
        )
        off += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    shm = new_shm_name()
    buf = allocate_kv_buffer((max(off, 1),), torch.uint8, shm)
    for entry, t in zip(manifest, weights.values()):
        _view(buf, entry).copy_(t)
    return shm, max(off, 1), manifest


def import_weights(shm: str, nbytes: int, manifest: list[dict], maps: SegmentMaps) -> dict[str, torch.Tensor]:
    """The weights of `export_weights` as views into the mapped segment (zero copy)."""
    buf = maps.get(shm, (nbytes,), torch.uint8)
    return {e["name"]: _view(buf, e) for e in manifest}


def _view(buf: torch.Tensor, e: dict) -> torch.Tensor:
    dt = _DTYPES[e["dtype"]]
    n = 1
    for d in e["shape"]:
        n *= d
    nbytes = n * dt.itemsize
    if e["offset"] + nbytes > buf.numel():
        raise ValueError(f"weight {e['name']} lies outside the shared segment")
    return buf[e["offset"] : e["offset"] + nbytes].view(dt).view(e["shape"])
