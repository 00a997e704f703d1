"""What the Semi-PD resident reports (issue #13): `GET /semi_pd/status` (`get_status`, with
each role's step timing), `/get_load` (`load`: both schedulers merged) and the server info
(`info`). A mixin of `ResidentProcess` (semi_pd/resident_process.py), which holds the state
it reads: the schedulers, worker links, split mechanism, controller, metrics and timings."""

from __future__ import annotations

import msgspec

from pdserve.enums import DisaggregationMode
from pdserve.messages import LoadResp, ServerInfo
from pdserve.semi_pd.worker_link import ROLES


class ResidentStatus:
    """`ResidentProcess`'s reporting half (no state of its own)."""

    def _step_timing(self, role: str) -> dict:
        """The last steps of a role: the worker's forward alone against the whole step as the
        resident sees it (batch built and sent, forward, logits back, sampling), ms."""
        samples = list(self.step_times[role])
        if not samples:
            return {"steps": 0, "forward_ms_p50": 0.0, "wall_ms_p50": 0.0, "overhead_ms_p50": 0.0}
        fwd = sorted(f for f, _ in samples)
        wall = sorted(w for _, w in samples)
        over = sorted(w - f for f, w in samples)
        mid = len(samples) // 2
        return {
            "steps": len(samples),
            "forward_ms_p50": fwd[mid] * 1000,
            "wall_ms_p50": wall[mid] * 1000,
            "overhead_ms_p50": over[mid] * 1000,
        }

    def get_status(self) -> dict:
        """The coordinator status of the seed (GET /semi_pd/status): JSON-like."""
        with self.lock:
            load = self.scheds["decode"].load()
        total = load.num_total_pages
        used = total - load.num_free_pages
        split = self.split.current
        attainment, completed = self.metrics.get_slo_attainment(self.args.slo_ttft_target, self.args.slo_tpot_target)
        return {
            "is_running": self.running and self.dead is None,
            "components": {
                "resident": True,
                "prefill_worker": self.links["prefill"].proc.poll() is None,
                "decode_worker": self.links["decode"].proc.poll() is None,
                "unified_memory": True,
                "slo_controller": self.controller is not None,
            },
            "workers": {
                r: {"pid": self.links[r].pid, "alive": self.links[r].proc.poll() is None, "restarts": self.restarts[r]}
                for r in ROLES
            },
            "current_split": split.as_dict(),
            "process_rotation_status": {
                "current_sm_allocation": str(split),
                "mechanism": self.split.mechanism,
                "rotation_seconds": getattr(self.split, "rotation_seconds", [])[-20:],
                "cpu_share": self.quota.describe(),
                "core_policy": self.policy,
                "step_gate": self.gate.status() if self.gate is not None else None,
                "plan": self.split.plan,
                "num_changes": len(self.split.history) - 1,  # the first entry is the start-up split
                "changes": [{"time": t, "split": str(a)} for t, a, _ in self.split.history[-50:]],
                "pin_seconds": {r: v[-20:] for r, v in self.pin_seconds.items()},
                "prefill_cap_tokens": self.split.prefill_cap,
                "prefill_cap_changes": [
                    {"time": t, "tokens": c} for t, c in getattr(self.split, "cap_history", [])[-50:]
                ],
            },
            "unified_memory_status": {
                "memory_usage": {
                    "total_memory_bytes": total * self.kv_bytes_per_page,
                    "allocated_memory_bytes": used * self.kv_bytes_per_page,
                    "utilization_ratio": used / total if total else 0.0,
                    "total_pages": total,
                    "free_pages": load.num_free_pages,
                    "page_size": self.args.page_size,
                }
            },
            "slo_controller_status": self.controller.get_status() if self.controller is not None else None,
            "metrics": self.metrics.get_real_time_metrics(),
            "step_timing": {role: self._step_timing(role) for role in ROLES},
            "slo": {
                "ttft_target_ms": self.args.slo_ttft_target,
                "tpot_target_ms": self.args.slo_tpot_target,
                "attainment": attainment,
                "completed_in_window": completed,
            },
        }

    def load(self, call_id: int) -> LoadResp:
        with self.lock:
            p, d = self.scheds["prefill"].load(), self.scheds["decode"].load()
        merged = msgspec.structs.replace(
            d,
            num_running_reqs=p.num_running_reqs + d.num_running_reqs,
            num_waiting_reqs=p.num_waiting_reqs + d.num_waiting_reqs,
            num_tokens=p.num_tokens + d.num_tokens,
            prompt_tokens=p.prompt_tokens + d.prompt_tokens,
            generation_tokens=d.generation_tokens,  # prefill's first token is counted again by decode
            prefill_computed_tokens=p.prefill_computed_tokens + d.prefill_computed_tokens,
            num_retractions=p.num_retractions + d.num_retractions,
        )
        return LoadResp(call_id, merged, DisaggregationMode.NULL, kv_store=self.kv_connector.stats())

    def info(self) -> ServerInfo:
        cfg, args = self.cfg, self.args
        return ServerInfo(
            max_total_num_tokens=self.scheduler.capacity_tokens,
            page_size=args.page_size,
            context_length=self.context_length,
            vocab_size=cfg.vocab_size,
            dtype=str(self.dtype).replace("torch.", ""),
            num_layers=cfg.num_layers,
            arch=cfg.arch,
            weight_bytes=self.weight_bytes,
            load_seconds=self.load_seconds,
            max_running_requests=args.max_running_requests,
            chunked_prefill_size=args.chunked_prefill_size,
            disable_radix_cache=True,
            tp_size=1,
        )
