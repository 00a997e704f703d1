"""Prefill/decode disaggregation: modes, poll states, the KV metadata record, env knobs, the
bootstrap server, and the KV transfer backends (transfer/). See docs/kv_transfer.md."""
