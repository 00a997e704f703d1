"""Builds a PD server's queues (the engine's PDQueues) inside its scheduler process: the
bootstrap server (prefill), one transfer manager per tp rank, the prefill or decode queues."""

from __future__ import annotations

import logging
import socket

from pdserve.disagg.decode import DecodeDisagg
from pdserve.disagg.prefill import PrefillDisagg
from pdserve.disagg.transfer.base import BaseKVManager, KVArgs
from pdserve.disagg.transfer.registry import KVClassType, get_kv_class
from pdserve.disagg.transfer.tp_group import TPKVManagerGroup
from pdserve.engine.pd_queues import PDContext, PDQueues
from pdserve.enums import DisaggregationMode, TransferBackend

logger = logging.getLogger("pdserve.scheduler")


def build_pd_queues(ctx: PDContext) -> PDQueues:
    args = ctx.args
    mode = args.disaggregation_mode
    backend = args.disaggregation_transfer_backend
    ip = socket.gethostbyname(args.host)
    bootstrap_server = None
    if mode == DisaggregationMode.PREFILL:
        bootstrap_server = get_kv_class(backend, KVClassType.BOOTSTRAP_SERVER)(
            args.host, args.disaggregation_bootstrap_port
        )
    tp = args.tp_size
    decode_shm = mode == DisaggregationMode.DECODE and backend == TransferBackend.SHM
    try:
        # one manager per tp rank, each registering as its engine_rank (transfer/tp_group.py)
        managers = [
            get_kv_class(backend, KVClassType.MANAGER)(
                KVArgs(
                    engine_rank=r,
                    kv_data=ctx.kv_pools[r],
                    host=ip,
                    port=0,
                    tp_size=tp,
                    total_num_kv_heads=ctx.total_num_kv_heads,
                    bootstrap_host=ip,
                    bootstrap_port=args.disaggregation_bootstrap_port,
                    shm_name=ctx.kv_shm[r] if decode_shm else None,
                    ib_device=args.disaggregation_ib_device,
                ),
                mode,
            )
            for r in range(tp)
        ]
    except BaseException:
        if bootstrap_server is not None:
            bootstrap_server.close()
        raise
    manager: BaseKVManager = managers[0] if tp == 1 else TPKVManagerGroup(managers)
    queues: PDQueues
    if mode == DisaggregationMode.PREFILL:
        manager.wait_registered(10)
        queues = PrefillDisagg(
            ctx.scheduler, manager, backend, args.disaggregation_bootstrap_port, bootstrap_server=bootstrap_server
        )
    else:
        queues = DecodeDisagg(ctx.scheduler, manager, backend, args.disaggregation_bootstrap_port)
    logger.info("PD %s mode, %s transfer backend", mode.value, backend.value)
    return queues
