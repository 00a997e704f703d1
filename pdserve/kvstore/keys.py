"""Page keys: one per full page of a prompt, a hash chain over the token pages, rooted in a
namespace that names the model and the KV layout, so that two servers share a key only when
the page's bytes are interchangeable."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class StoreLayout:
    """What a page's bytes depend on, beside its tokens."""

    model: str  # the model's identity (file name + size, or the served name)
    page_size: int
    num_layers: int
    kv_heads: int  # heads in this record (a tp rank's share)
    head_dim: int
    dtype: str
    head_start: int = 0  # first global KV head in the record (tp ranks hold different heads)

    def namespace(self) -> bytes:
        return hashlib.sha256(repr(tuple(self.__dict__.values())).encode()).digest()

    @property
    def page_nbytes(self) -> int:
        elt = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return self.num_layers * 2 * self.page_size * self.kv_heads * self.head_dim * elt


def model_identity(path: str) -> str:
    """A model's identity in keys: the file or directory name and the size of its weights
    (a directory: config.json and *.safetensors), so the same files share keys anywhere."""
    path = os.path.normpath(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors") or n == "config.json")
        size = sum(os.path.getsize(os.path.join(path, n)) for n in names)
    else:
        size = os.path.getsize(path)
    return f"{os.path.basename(path)}:{size}"


def page_keys(layout: StoreLayout, token_ids: Sequence[int], max_pages: int | None = None) -> list[str]:
    """Keys of the full pages of `token_ids` (a partial last page has none): key i hashes key
    i-1 and the tokens of page i, so a key names the whole prefix up to its page."""
    page_size = layout.page_size
    n = len(token_ids) // page_size
    if max_pages is not None:
        n = min(n, max_pages)
    toks = np.asarray(token_ids[: n * page_size], dtype="<u4").tobytes()
    h = layout.namespace()
    out = []
    for i in range(n):
        h = hashlib.sha256(h + toks[i * page_size * 4 : (i + 1) * page_size * 4]).digest()
        out.append(h.hex())
    return out
