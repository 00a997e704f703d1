"""The scheduler's KV connector from `--kv-store` (engine/kv_connector.py): none, or a
store of pdserve/kvstore by URL scheme (kvstore/stores.py: http, mooncake, memory)."""

from __future__ import annotations

import logging

import torch

from pdserve.engine.kv_connector import BaseKVConnector, NoKVConnector
from pdserve.kvstore.keys import StoreLayout, model_identity
from pdserve.model.config import ModelConfig

logger = logging.getLogger(__name__)


def store_layout(model_path: str, cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> StoreLayout:
    """What a page's bytes depend on beside its tokens: two servers share keys only if equal."""
    return StoreLayout(
        model=model_identity(model_path),
        page_size=page_size,
        num_layers=cfg.num_layers,
        kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=str(dtype).replace("torch.", ""),
    )


def create_kv_connector(
    url: str | None, layout: StoreLayout, pool: torch.Tensor | list[torch.Tensor], timeout_s: float
) -> BaseKVConnector:
    """`url` None: `NoKVConnector`. `pool`: the KV pool, or every tp rank's in rank order. A store that cannot be opened (Mooncake's master down)
    is logged and serving goes on without it: a store never stops a server."""
    if url is None:
        return NoKVConnector()
    from pdserve.engine.kv_store_connector import StoreConnector
    from pdserve.kvstore.stores import open_store

    try:
        store = open_store(url)
    except ValueError:
        raise
    except Exception as e:
        logger.error("KV store %s cannot be opened (%s): serving without it", url, e)
        return NoKVConnector()
    return StoreConnector(store, url, layout, pool, timeout_s)
