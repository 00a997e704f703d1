"""Rollout strategies for RL frameworks (issue #15, seed 000): a base class, a registry and
two strategies.

- `sglang_pd_dis` (SgLangPdDisStrategy): world_size ranks, the first half prefill engines and
  the second half decode engines, a PD router on rank 0 over all of them; `generate` goes
  through the router.
- `sglang` (SgLangStrategy): one co-located (mode null) engine per rank; `generate` spreads
  the batch over them. For comparison.

Each rank is a Ray actor (pdserve/launch/ray_actor.py) that runs its engine's server, placed
by Ray on any node of the cluster with the CPU (or GPU) resources it asks for. The strategy
(on the driver) talks HTTP to the engines: generation through the router or the engines,
weight sync and memory through each engine's SGLang endpoints (docs/rl.md).
"""

from __future__ import annotations

import abc
import base64
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

import httpx
import torch

from pdserve.rl.config import BASE_PORT, StrategyArgs
from pdserve.rl.layout import RankPlan, colocated_plan, device_count, pd_plan

logger = logging.getLogger("pdserve.rl")

STRATEGIES: dict[str, type[InferenceStrategy]] = {}


def register(cls: type[InferenceStrategy]) -> type[InferenceStrategy]:
    STRATEGIES[cls.name] = cls
    return cls


def create_strategy(args: StrategyArgs | dict, world_size: int, **kw: Any) -> InferenceStrategy:
    if isinstance(args, dict):
        args = StrategyArgs.from_dict(args)
    cls = STRATEGIES.get(args.strategy_name)
    if cls is None:
        raise ValueError(f"unknown strategy_name {args.strategy_name!r}; one of {sorted(STRATEGIES)}")
    return cls(args, world_size, **kw)


class Pending:
    """Calls under way on every engine (they wait for the trainer's side of a collective)."""

    def __init__(self, futures: list[Future]) -> None:
        self.futures = futures

    def wait(self, timeout: float | None = None) -> list[dict]:
        out = []
        for f in self.futures:
            status, body = f.result(timeout)
            if status != 200:
                raise RuntimeError(f"engine call failed ({status}): {body}")
            out.append(body)
        return out


class InferenceStrategy(abc.ABC):
    name: ClassVar[str]

    def __init__(
        self,
        args: StrategyArgs,
        world_size: int,
        host: str = "127.0.0.1",
        cpus_per_rank: float | None = None,
        startup_timeout: float = 300,
    ) -> None:
        self.args = args
        self.world_size = world_size
        self.host = host
        self.flags = args.engine_flags()  # a bad key fails here, before anything starts
        self.base_port = int(args.get("base_port", BASE_PORT))
        self.plans = self.make_plan()
        devices = device_count()
        self.cpus_per_rank = cpus_per_rank or max(1, devices // max(1, world_size))
        self.startup_timeout = startup_timeout
        self.actors: list[Any] = []
        self.urls: list[str] = []
        self._pool = ThreadPoolExecutor(max(4, 2 * world_size), thread_name_prefix="pdserve-rl")
        self._http = httpx.Client(timeout=None)

    @abc.abstractmethod
    def make_plan(self) -> list[RankPlan]: ...

    @abc.abstractmethod
    def initialize(self) -> None:
        """Start every rank's engine (and the router)."""

    @abc.abstractmethod
    def generate_url(self, i: int) -> str:
        """Where the i-th request of a batch goes."""

    # ---- engines ----------------------------------------------------------------------------
    def _start_actors(self) -> None:
        import ray

        from pdserve.launch.ray_actor import RayProcessActor

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        remote = ray.remote(RayProcessActor)
        threads = max(1, int(self.cpus_per_rank))
        self.actors = [remote.options(num_cpus=self.cpus_per_rank).remote(self.host) for _ in self.plans]
        starts = []
        for plan, actor in zip(self.plans, self.actors):
            role = None if self.name == "sglang" else plan.role
            boot = plan.bootstrap_port if role == "prefill" else None
            starts.append(
                actor.start_server.remote(
                    plan.port, self.flags, role, boot, plan.tp_size, threads, self.startup_timeout
                )
            )
        try:
            self.urls = ray.get(starts)
        except Exception as e:
            self.shutdown()
            cause = getattr(e, "cause", None) or e
            raise RuntimeError(f"{self.name}: an engine did not start: {cause}") from None

    @property
    def engine_urls(self) -> list[str]:
        return list(self.urls)

    def _post(self, url: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        r = self._http.post(url + path, json=body or {})
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def _on_all(self, path: str, body: dict | None = None) -> Pending:
        return Pending([self._pool.submit(self._post, u, path, body) for u in self.urls])

    # ---- rollouts ---------------------------------------------------------------------------
    def generate(
        self, prompts: list[str] | list[list[int]], sampling_params: dict | list[dict], return_logprob: bool = True
    ) -> list[dict]:
        """One result per prompt: output_ids, text, output_token_logprobs, finish_reason."""
        if isinstance(sampling_params, dict):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("sampling_params must be one dict or one per prompt")

        def one(i: int) -> dict:
            p = prompts[i]
            body: dict[str, Any] = {"sampling_params": sampling_params[i], "return_logprob": return_logprob}
            body["text" if isinstance(p, str) else "input_ids"] = p
            status, out = self._post(self.generate_url(i), "/generate", body)
            if status != 200:
                raise RuntimeError(f"request {i} failed ({status}): {out}")
            meta = out.get("meta_info", {})
            return {
                "output_ids": out.get("output_ids"),
                "text": out.get("text"),
                "output_token_logprobs": [lp[0] for lp in meta.get("output_token_logprobs") or []],
                "finish_reason": (meta.get("finish_reason") or {}).get("type"),
            }

        return list(self._pool.map(one, range(len(prompts))))

    # ---- weight sync (the trainer is rank 0: pdserve/rl/trainer.py) --------------------------
    def weight_sync_world_size(self) -> int:
        return 1 + sum(p.tp_size for p in self.plans)

    def setup_collective_group(
        self, group_name: str, master_address: str, master_port: int, backend: str = "gloo"
    ) -> Pending:
        """Every engine joins `group_name` with rank 1 + the tp ranks of the engines before it
        (so prefill and decode may have different tp sizes). Call the trainer's
        `TrainerGroup.connect()` next, then `wait()`."""
        world = self.weight_sync_world_size()
        futures, offset = [], 1
        for plan, url in zip(self.plans, self.urls):
            body = {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": offset,
                "world_size": world,
                "group_name": group_name,
                "backend": backend,
            }
            futures.append(self._pool.submit(self._post, url, "/init_weights_update_group", body))
            offset += plan.tp_size
        return Pending(futures)

    def broadcast_parameter(
        self, group_name: str, names: list[str], dtypes: list[str], shapes: list[list[int]]
    ) -> Pending:
        """Engines receive one broadcast per name; the trainer sends them next."""
        return self._on_all(
            "/update_weights_from_distributed",
            {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name},
        )

    def broadcast_bucket(self, group_name: str, meta_infos: list[dict]) -> Pending:
        """Engines receive one flat broadcast holding the tensors of `meta_infos`
        ([{name, dtype, shape}], in order); the trainer sends `TrainerGroup.broadcast_bucket`."""
        return self._on_all(
            "/update_weights_from_distributed",
            {
                "names": [m["name"] for m in meta_infos],
                "dtypes": [m["dtype"] for m in meta_infos],
                "shapes": [list(m["shape"]) for m in meta_infos],
                "group_name": group_name,
                "load_format": "flattened_bucket",
            },
        )

    def update_parameter(self, name: str, weight: torch.Tensor) -> list[dict]:
        """Point to point (the trainer and the engines share a machine): the tensor goes as a
        safetensors file over HTTP."""
        return self.update_parameters({name: weight})

    def update_parameter_in_bucket(self, meta_infos: list[dict], buffer: torch.Tensor) -> list[dict]:
        """`buffer`: flat bytes; `meta_infos`: [{name, dtype, shape, offset}] (offset in bytes;
        back to back when absent)."""
        from pdserve.model.weight_update import parse_dtype

        flat = buffer.contiguous().view(-1).view(torch.uint8)
        named, off = {}, 0
        for m in meta_infos:
            dt = parse_dtype(m["dtype"])
            off = m.get("offset", off)
            n = torch.Size(m["shape"]).numel() * dt.itemsize
            if off + n > flat.numel():
                raise ValueError(f"{m['name']}: bytes {off}..{off + n} lie outside the {flat.numel()}-byte bucket")
            named[m["name"]] = flat[off : off + n].view(dt).view(m["shape"]).clone()
            off += n
        return self.update_parameters(named)

    def update_parameters(self, named: dict[str, torch.Tensor]) -> list[dict]:
        from safetensors.torch import save

        payload = base64.b64encode(save({k: v.contiguous() for k, v in named.items()})).decode()
        return self._on_all("/update_weights_from_tensor", {"serialized_named_tensors": [payload]}).wait()

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        return [
            body for body in self._on_all("/get_weights_by_name", {"name": name, "truncate_size": truncate_size}).wait()
        ]

    # ---- memory -----------------------------------------------------------------------------
    def offload_states(self, include: list[str] | None = None) -> list[dict]:
        """Give the engines' weights and KV pool back to the OS (SGLang's
        release_memory_occupation); refused while requests are in flight."""
        return self._on_all("/release_memory_occupation", {"tags": include}).wait()

    def load_states(self, include: list[str] | None = None) -> list[dict]:
        return self._on_all("/resume_memory_occupation", {"tags": include}).wait()

    def engine_rss_bytes(self) -> list[int]:
        import ray

        return ray.get([a.rss_bytes.remote() for a in self.actors])

    # ---- end --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.get(a.stop.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - an actor already gone
                pass
            ray.kill(a)
        self.actors = []
        self._http.close()
        self._pool.shutdown(wait=False)

    def __enter__(self) -> InferenceStrategy:
        self.initialize()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


@register
class SgLangPdDisStrategy(InferenceStrategy):
    name = "sglang_pd_dis"

    def make_plan(self) -> list[RankPlan]:
        tp = self.args.get("tp_size")
        return pd_plan(
            self.world_size, self.args.get("prefill_tp_size", tp), self.args.get("decode_tp_size", tp), self.base_port
        )

    def initialize(self) -> None:
        import ray

        for plan in self.plans:
            logger.info(plan.log_line())
        self._start_actors()
        for plan in self.plans:
            logger.info("[sglang_pd_dis] Initialized %s engine on rank %d", plan.role, plan.global_rank)
        prefill = [(u, p.bootstrap_port) for p, u in zip(self.plans, self.urls) if p.is_prefill]
        decode = [u for p, u in zip(self.plans, self.urls) if p.is_decode]
        logger.info("[sglang_pd_dis][router] Initializing router with prefill URLs: %s", [u for u, _ in prefill])
        logger.info("[sglang_pd_dis][router] Initializing router with decode URLs: %s", decode)
        router_port = int(self.args.get("router_port", self.base_port - 1))
        try:
            self.router_url = ray.get(self.actors[0].start_router.remote(router_port, prefill, decode))
        except Exception as e:
            self.shutdown()
            raise RuntimeError(f"sglang_pd_dis: the router did not start: {getattr(e, 'cause', None) or e}") from None
        logger.info("[sglang_pd_dis][router] Router started successfully")

    def generate_url(self, i: int) -> str:
        return self.router_url


@register
class SgLangStrategy(InferenceStrategy):
    name = "sglang"

    def make_plan(self) -> list[RankPlan]:
        return colocated_plan(self.world_size, self.args.get("tp_size"), self.base_port)

    def initialize(self) -> None:
        self._start_actors()
        for plan in self.plans:
            logger.info("[sglang] Initialized engine on rank %d", plan.global_rank)

    def generate_url(self, i: int) -> str:
        return self.urls[i % len(self.urls)]
