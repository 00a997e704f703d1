"""Semi-PD (issue #13, docs/semi_pd.md): prefill and decode as separate workers on one
machine, each with a share of its compute, sharing one copy of the weights and one paged
KV pool; an SLO-aware controller moves the split at run time.

One role per module:
    roles.py                   InstanceRole (PREFILL / DECODE)
    unified_memory_manager.py  the KV block pool shared by both roles, atomic across processes
    allocation.py              SMAllocation: a (prefill %, decode %) compute split
    metrics_collector.py       TTFT / TPOT / throughput / queues over a sliding window
    latency_model.py           online fit of prefill and decode step times against the split
    actuator.py                where a chosen split goes (base, registry, in-memory fake)
    slo_algorithm.py           SLOConstraints and the SLO-aware split controller

Not built yet: the resident process, the workers, process rotation, the coordinator and
`pdserve serve --enable-semi-pd` (the flags are validated, then refused as not supported).
"""
