"""`pdserve launch --ray`: the same xPyD deployment as `pdserve launch`, placed on a Ray
cluster by resources. Each server is a Ray actor (pdserve/launch/ray_actor.py) asking for
--ray-cpus-per-server CPUs, so Ray spreads them over the cluster's nodes; the router is one
more actor (no CPUs reserved). KV moves over the chosen transfer backend between nodes (tcp
works everywhere; shm only within one node).

`--ray-address` joins an existing cluster (`ray start --head` on one node, `ray start
--address=...` on the others); without it a local Ray is started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import ray  # the optional extra pdserve[ray]: launch/cli.py turns its absence into a clear error

from pdserve.launch.ray_actor import RayProcessActor


def run_on_ray(a: argparse.Namespace, common: list[str]) -> int:
    ray.init(address=a.ray_address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(RayProcessActor)
    n = a.prefill + a.decode
    actors = [remote.options(num_cpus=a.ray_cpus_per_server).remote(a.host) for _ in range(n)]
    router_actor = remote.options(num_cpus=0).remote(a.host)
    everyone = [*actors, router_actor]

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        nodes = ray.get([x.node.remote() for x in actors])
        starts, prefill_args, decode_urls = [], [], []
        threads = max(1, int(a.ray_cpus_per_server))
        for i, actor in enumerate(actors):
            role = "prefill" if i < a.prefill else "decode"
            port = a.port + 1 + i
            boot = a.bootstrap_port_base + i if role == "prefill" else None
            tp = a.prefill_tp_size if role == "prefill" else a.decode_tp_size
            starts.append(
                actor.start_server.remote(
                    port, common, role, boot, tp, threads, a.startup_timeout, advertise=_advertised(a.host, nodes[i][1])
                )
            )
        try:
            urls = ray.get(starts)
        except Exception as e:  # a server's start-up error (its own one-line message is above)
            print(f"pdserve launch: a server did not start: {getattr(e, 'cause', None) or e}", file=sys.stderr)
            return 2
        for i, url in enumerate(urls):
            role = "prefill" if i < a.prefill else "decode"
            if role == "prefill":
                prefill_args.append((url, a.bootstrap_port_base + i))
            else:
                decode_urls.append(url)
            print(f"started {role} server {url} on Ray node {nodes[i][0]} ({nodes[i][1]})", flush=True)
        try:
            rurl = ray.get(
                router_actor.start_router.remote(a.port, prefill_args, decode_urls, a.startup_timeout, policy=a.policy)
            )
        except Exception as e:
            print(f"pdserve launch: the router did not start: {getattr(e, 'cause', None) or e}", file=sys.stderr)
            return 2
        print(
            f"pdserve {a.prefill}P{a.decode}D is ready at {rurl} on Ray "
            f"({len({nd for nd, _ in nodes})} nodes, {a.disaggregation_transfer_backend} KV transfer)",
            flush=True,
        )
        while True:
            dead = [i for i, ok in enumerate(ray.get([x.alive.remote() for x in everyone])) if not ok]
            if dead:
                print(f"pdserve launch: {len(dead)} process(es) exited; stopping everything", file=sys.stderr)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for x in everyone:
            try:
                ray.get(x.stop.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - an actor already gone
                pass
        ray.shutdown()


def _advertised(host: str, node_ip: str) -> str:
    """The address others reach a server at: its node's IP when it binds every address."""
    return node_ip if host in ("0.0.0.0", "::") else host
