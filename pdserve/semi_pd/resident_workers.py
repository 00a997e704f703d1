"""The Semi-PD workers' lifecycle (issue #13): a new worker on the shared weights and KV
pool, started from the resident's main thread; the recovery when one dies; re-pinning both
to a new split. A mixin of `ResidentProcess` (semi_pd/resident_process.py), which holds the
state it uses: the worker links, the schedulers, the split and the lock."""

from __future__ import annotations

import concurrent.futures
import logging
import subprocess
import threading

from pdserve.engine.request import ReqStatus
from pdserve.messages import FinishReason, FinishReasonType
from pdserve.semi_pd.allocation import SMAllocation
from pdserve.semi_pd.worker_link import ROLES, WorkerLink

logger = logging.getLogger("pdserve.semi_pd")


class ResidentWorkers:
    """`ResidentProcess`'s worker lifecycle (no state of its own)."""

    def _popen(self, cmd: list[str]) -> subprocess.Popen:
        """Start a worker from the main thread: a worker dies with the *thread* that started it
        (PR_SET_PDEATHSIG follows the parent thread), so not from a rotation thread that ends."""
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(cmd)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.spawns.put((cmd, fut))
        return fut.result(timeout=60)

    def _serve_spawns(self) -> None:
        while not self.spawns.empty():
            cmd, fut = self.spawns.get_nowait()
            try:
                fut.set_result(subprocess.Popen(cmd))
            except Exception as e:
                fut.set_exception(e)

    def start_worker(self, role: str, share: dict) -> WorkerLink:
        """A new worker on the shared weights and pool, ready and held to `share`."""
        link = WorkerLink(role, self.args, self.kv_shm_name, self.num_pages, share["threads"], popen=self._popen)
        link.send(self.worker_init)
        head, _ = link.wait("ready")
        link.pid = int(head["pid"])
        link.pin(share)
        self.quota.set_quota(role, link.pid, share["quota_cores"], share.get("weight"))
        return link

    def _recover(self, role: str, why: str) -> None:
        """A worker died: end the requests it was running (their pages are freed), start a
        new one on the same weights and pool, and carry on. Requests still waiting for it,
        and everything the other worker runs, are not touched."""
        message = f"the Semi-PD {role} worker died ({why}); this request was ended: retry it"
        logger.error("Semi-PD: %s; restarting it", why)
        reason = FinishReason(FinishReasonType.ABORT, message=message, status_code=503)
        with self.lock:
            sched = self.scheds[role]
            for rid in [r for r, who in self.role_of.items() if who == role]:
                req = sched.get(rid)
                if req is not None and req.status == ReqStatus.RUNNING:
                    sched.fail(req, reason)
                    self.max_new_tokens.pop(rid, None)
            self._emit(sched.take_outputs())
        self.links[role].close()
        link = self.start_worker(role, self.split.plan[role])
        self.links[role] = link
        self.runners[role].model.link = link
        self.restarts[role] += 1
        logger.info("Semi-PD: %s worker restarted (pid %d)", role, link.pid)

    def pin_workers(self, allocation: SMAllocation, plan: dict | None = None) -> None:
        """Both workers to the shares of `allocation` (whose plan is `plan`, computed if not
        given), in place: cores and threads before their next step, CFS quota now."""
        plan = plan or self.plan_for(allocation)
        for role in ROLES:
            self.pending_pin[role] = plan[role]
            self.wake[role].set()
            link = self.links[role]
            if link.pid:
                self.quota.set_quota(role, link.pid, plan[role]["quota_cores"], plan[role]["weight"])
        logger.info(
            "Semi-PD split %s: prefill cores %s, decode cores %s (%s)",
            allocation,
            plan["prefill"]["cores"],
            plan["decode"]["cores"],
            self.quota.describe(),
        )
