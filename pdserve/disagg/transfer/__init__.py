"""KV transfer backends: one interface (base.py), a registry (registry.py) and the fake, tcp
and shm implementations. See docs/kv_transfer.md."""
