"""`pdserve launch`: an xPyD deployment on one machine (N prefill, M decode servers and
the router), cores split between the servers, stopped cleanly on Ctrl-C, SIGTERM or SIGHUP.
If launch itself is killed (even SIGKILL), its servers and router follow it down (Linux
parent-death signal), and their scheduler and tensor-parallel processes follow them."""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pdserve.cpus import my_cores, split_cores
from pdserve.launch.children import child_setup, wait_healthy


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    url: str | None = None


def build_parser() -> argparse.ArgumentParser:
    from pdserve.cli import Parser
    from pdserve.config import DTYPES, ServerArgs
    from pdserve.disagg.transfer.registry import TransferBackend
    from pdserve.router.config import POLICY_NAMES, RouterConfig

    p = Parser(prog="pdserve launch", description=__doc__)
    p.add_argument("--prefill", type=int, default=1, help="number of prefill servers")
    p.add_argument("--decode", type=int, default=1, help="number of decode servers")
    p.add_argument(
        "--pd-ratio", default=None, metavar="P:D", help="another spelling of --prefill P --decode D (e.g. 2:3)"
    )
    p.add_argument(
        "--prefill-tp-size",
        type=int,
        default=1,
        help="tensor-parallel ranks of each prefill server (they split its cores)",
    )
    p.add_argument(
        "--decode-tp-size",
        type=int,
        default=1,
        help="tensor-parallel ranks of each decode server (may differ from prefill's)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address of the router and the servers")
    p.add_argument(
        "--port", type=int, default=30000, help="router port (the endpoint); the servers take the ports after it"
    )
    p.add_argument(
        "--disaggregation-transfer-backend",
        "--transfer-backend",
        dest="disaggregation_transfer_backend",
        default=ServerArgs.disaggregation_transfer_backend,
        choices=[b.value for b in TransferBackend],
        help="how KV moves from prefill to decode: tcp (any hosts), shm (same host, no copy "
        "through sockets), nixl / mooncake (their engines; optional extras), fake (moves "
        "nothing; for tests)",
    )
    p.add_argument(
        "--disaggregation-ib-device",
        default=None,
        help="RDMA devices for the mooncake backend; unset: its TCP transport",
    )
    p.add_argument(
        "--model-path",
        default=None,
        help="local HF model directory or .gguf file (default: the packaged SmolLM2-135M-Instruct)",
    )
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype of every server")
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size of each server in tokens")
    p.add_argument("--base-gpu-id", type=int, default=0, help="first GPU (GPU builds; ignored on CPU)")
    p.add_argument(
        "--bootstrap-port-base",
        type=int,
        default=8998,
        help="bootstrap port of the first prefill server; the next ones count up",
    )
    p.add_argument(
        "--policy",
        default=RouterConfig.policy,
        choices=POLICY_NAMES,
        help="the router's policy (the same default as `pdserve router` and SGLang's router)",
    )
    p.add_argument(
        "--server-args",
        default="",
        help="extra flags for every `pdserve serve`, one quoted string; a value starting with "
        "-- is fine (--server-args '--max-running-requests 8'); checked before anything starts",
    )
    p.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for every server")
    p.add_argument(
        "--cpu-split",
        default="disjoint",
        choices=("disjoint", "shared"),
        help="disjoint: each server pinned to its own cores (no interference; each phase "
        "gets a share); shared: every server may use every core (a lone phase gets "
        "them all at low load, phases compete under load)",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="place the servers and the router on a Ray cluster by resources (optional extra "
        "pdserve[ray]); --cpu-split does not apply",
    )
    p.add_argument(
        "--ray-address", default=None, help="with --ray: the cluster to join (ray start --head ...); unset: a local Ray"
    )
    p.add_argument(
        "--ray-cpus-per-server",
        type=float,
        default=1.0,
        help="with --ray: CPUs each server asks Ray for (and its thread count)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of start-up errors")
    return p


def normalize_argv(argv: list[str]) -> list[str]:
    """`--server-args '--x 1'` -> `--server-args=--x 1` (argparse would take '--x 1' for a flag)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--server-args" and i + 1 < len(argv):
            out.append("--server-args=" + argv[i + 1])
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def server_args_of(a: argparse.Namespace, extra: list[str]) -> list[str]:
    """Flags every server gets (before its role's own)."""
    common = [
        "--host",
        a.host,
        "--dtype",
        a.dtype,
        "--disaggregation-transfer-backend",
        a.disaggregation_transfer_backend,
    ]
    if a.model_path:
        common += ["--model-path", a.model_path]
    if a.disaggregation_ib_device:
        common += ["--disaggregation-ib-device", a.disaggregation_ib_device]
    if a.max_total_tokens:
        common += ["--max-total-tokens", str(a.max_total_tokens)]
    return common + extra


def check_flags(a: argparse.Namespace) -> list[str]:
    """Validates launch's flags and --server-args as the servers will see them, before anything
    starts. Returns the extra server flags; raises ValueError (flag + fix)."""
    if a.ray_address is not None and not a.ray:
        raise ValueError("--ray-address needs --ray")
    if a.ray_cpus_per_server <= 0:
        raise ValueError("--ray-cpus-per-server must be > 0")
    if a.pd_ratio is not None:
        parts = a.pd_ratio.split(":")
        if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            raise ValueError(f"--pd-ratio {a.pd_ratio!r} must be P:D with two integers, e.g. 2:3")
        a.prefill, a.decode = int(parts[0]), int(parts[1])
    for flag in ("prefill", "decode", "prefill_tp_size", "decode_tp_size"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if not (0 < a.port < 65536):
        raise ValueError("--port must be in 1..65535")
    try:
        extra = shlex.split(a.server_args)
    except ValueError as e:
        raise ValueError(f"--server-args {a.server_args!r}: {e}") from None
    owned = {"--port", "--disaggregation-mode", "--disaggregation-bootstrap-port", "--tp-size", "--num-threads"}
    for f in extra:
        if f.split("=")[0] in owned:
            raise ValueError(
                f"--server-args: {f.split('=')[0]} is set by launch for each server; "
                f"use launch's own flags (--port, --prefill-tp-size, --decode-tp-size, ...)"
            )
    from pdserve.server.preflight import check_model
    from pdserve.server.serve_cli import args_from_namespace, build_parser as serve_parser

    sp = serve_parser()
    ns, unknown = sp.parse_known_args(server_args_of(a, extra) + ["--port", str(a.port + 1)])
    if unknown:
        raise ValueError(f"--server-args: `pdserve serve` has no flag {unknown[0]} (see `pdserve serve --help`)")
    args = args_from_namespace(ns)
    from pdserve.enums import TransferBackend
    from pdserve.setting_checks import missing_package

    # the servers check it too, but each would print it: one line from launch, before any starts
    missing = missing_package(TransferBackend(a.disaggregation_transfer_backend))
    if missing:
        raise ValueError(f"--transfer-backend {a.disaggregation_transfer_backend}: {missing}")
    check_model(args, tp_flags={"--prefill-tp-size": a.prefill_tp_size, "--decode-tp-size": a.decode_tp_size})
    from pdserve.server.serve_cli import check_port

    n = a.prefill + a.decode
    for port in range(a.port, a.port + n + 1):  # the router's, then one per server
        if port > 65535:
            raise ValueError(f"--port {a.port}: the servers need the {n} ports after it")
        try:
            check_port(a.host, port)
        except ValueError:
            raise ValueError(
                f"--port {a.port}: port {port} is taken (the router uses --port, the servers the "
                f"{n} after it); pick another --port"
            ) from None
    for port in range(a.bootstrap_port_base, a.bootstrap_port_base + a.prefill):
        try:
            check_port(a.host, port)
        except ValueError:
            raise ValueError(
                f"--bootstrap-port-base {a.bootstrap_port_base}: port {port} is taken; "
                f"pick another --bootstrap-port-base"
            ) from None
    return extra


def stop_all(children: list[Child]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut this short
        signal.signal(sig, signal.SIG_IGN)
    for c in reversed(children):
        if c.proc.poll() is None:
            try:
                os.killpg(c.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 20
    for c in children:
        try:
            c.proc.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(c.proc.pid, signal.SIGKILL)
            c.proc.wait()


def main(argv: list[str]) -> int:
    from pdserve.cli import fail

    parser = build_parser()
    a = parser.parse_args(normalize_argv(argv))
    try:
        extra = check_flags(a)
    except (ValueError, FileNotFoundError) as e:
        if a.debug:
            raise
        return fail(parser.prog, str(e))
    if a.ray:
        try:
            from pdserve.launch.ray_launch import run_on_ray
        except ImportError:
            return fail(parser.prog, "--ray needs Ray: pip install 'pdserve[ray]'")
        return run_on_ray(a, server_args_of(a, extra))
    n = a.prefill + a.decode
    cores = my_cores()
    groups = split_cores(cores, n) if a.cpu_split == "disjoint" else [cores] * n
    py = sys.executable
    children: list[Child] = []

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)  # terminal closed: stop everything, as for SIGTERM
    me = os.getpid()
    try:
        common = server_args_of(a, extra)
        prefill_args: list[str] = []
        decode_urls: list[str] = []
        for i in range(n):
            role = "prefill" if i < a.prefill else "decode"
            port = a.port + 1 + i
            cmd = [
                py,
                "-m",
                "pdserve.cli",
                "serve",
                "--port",
                str(port),
                "--disaggregation-mode",
                role,
                "--num-threads",
                str(len(groups[i])),
                "--tp-size",
                str(a.prefill_tp_size if role == "prefill" else a.decode_tp_size),
                *common,
            ]
            if role == "prefill":
                boot = a.bootstrap_port_base + i
                cmd += ["--disaggregation-bootstrap-port", str(boot)]
            cpus = groups[i]
            child_env = dict(os.environ)
            if a.cpu_split == "shared" and role == "decode":
                # servers on the same cores: decode's OpenMP threads must not spin-wait on
                # cores the prefill needs (its steps are short and frequent)
                child_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            proc = subprocess.Popen(cmd, start_new_session=True, env=child_env, preexec_fn=child_setup(me, cpus))
            url = f"http://{a.host}:{port}"
            children.append(Child(f"{role}-{i}", proc, url))
            if role == "prefill":
                prefill_args += ["--prefill", url, str(boot)]
            else:
                decode_urls.append(url)
            print(f"started {role} server {url} on cores {cpus}", flush=True)
        deadline = time.time() + a.startup_timeout
        for c in children:
            wait_healthy(c.url, c.proc, deadline)
        router_cmd = [
            py,
            "-m",
            "pdserve.cli",
            "router",
            "--pd-disaggregation",
            *prefill_args,
            *sum((["--decode", u] for u in decode_urls), []),
            "--host",
            a.host,
            "--port",
            str(a.port),
            "--policy",
            a.policy,
        ]
        router = subprocess.Popen(router_cmd, start_new_session=True, preexec_fn=child_setup(me))
        rurl = f"http://{a.host}:{a.port}"
        children.append(Child("router", router, rurl))
        wait_healthy(rurl, router, deadline, "/readiness")
        print(
            f"pdserve {a.prefill}P{a.decode}D is ready at {rurl} ({a.disaggregation_transfer_backend} KV transfer)\n"
            f"  try: curl {rurl}/v1/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"messages": [{{"role": "user", "content": "What is the capital of France?"}}], '
            f'"max_tokens": 32, "temperature": 0}}\'',
            flush=True,
        )
        while all(c.proc.poll() is None for c in children):
            time.sleep(0.5)
        dead = [c.name for c in children if c.proc.poll() is not None]
        print(f"pdserve launch: {', '.join(dead)} exited; stopping everything", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:  # start-up failed (a child's own one-line error is above): status 2
        print(f"pdserve launch: {e}", file=sys.stderr)
        return 2
    finally:
        stop_all(children)
