"""KV cache data service: KV pages shared by serving instances, keyed by a hash chain of
their token pages (docs/kvstore.md)."""
