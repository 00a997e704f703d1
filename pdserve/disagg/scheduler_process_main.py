"""`python -m pdserve.disagg.scheduler_process_main ARGS_JSON RECV SEND`: the scheduler
process the front end starts (server/tokenizer_manager.py). It is the engine's
`SchedulerProcess` with the PD queues plugged in (setup.py: build_pd_queues), which is why it
lives in the disagg layer: the engine does not import disagg."""

from __future__ import annotations

import json
import sys

from pdserve.config import ServerArgs
from pdserve.disagg.setup import build_pd_queues
from pdserve.engine.scheduler_process import run_scheduler_process


def main() -> None:
    """No pickled state crosses the process boundary: arguments come as JSON."""
    raw = json.loads(sys.argv[1])
    run_scheduler_process(ServerArgs(**raw), sys.argv[2], sys.argv[3], pd_setup=build_pd_queues)


if __name__ == "__main__":
    main()
