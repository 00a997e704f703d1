"""`pdserve launch`: an xPyD deployment on one machine (N prefill, M decode servers and
the router), cores split between the servers, stopped cleanly on Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from pdserve.cpus import my_cores, split_cores


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    url: str | None = None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve launch", description=__doc__)
    p.add_argument("--prefill", type=int, default=1, help="number of prefill servers")
    p.add_argument("--decode", type=int, default=1, help="number of decode servers")
    p.add_argument("--prefill-tp-size", type=int, default=1,
                   help="tensor-parallel ranks of each prefill server (they split its cores)")
    p.add_argument("--decode-tp-size", type=int, default=1,
                   help="tensor-parallel ranks of each decode server (may differ from prefill's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000, help="router port (the endpoint)")
    p.add_argument("--transfer-backend", default="tcp", choices=("tcp", "shm", "fake"))
    p.add_argument("--model-path", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--base-gpu-id", type=int, default=0, help="first GPU (GPU builds; ignored on CPU)")
    p.add_argument("--bootstrap-port-base", type=int, default=8998)
    p.add_argument("--policy", default="round_robin")
    p.add_argument("--server-args", default="", help="extra flags for every `pdserve serve`")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--cpu-split", default="disjoint", choices=("disjoint", "shared"),
                   help="disjoint: each server pinned to its own cores (no interference; each phase "
                        "gets a share); shared: every server may use every core (a lone phase gets "
                        "them all at low load, phases compete under load)")
    return p


def wait_healthy(url: str, proc: subprocess.Popen, deadline: float, path: str = "/health") -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with code {proc.returncode} during startup")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not become healthy in time")


def stop_all(children: list[Child]) -> None:
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
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.prefill < 1:
        parser.error("--prefill must be >= 1")
    if a.decode < 1:
        parser.error("--decode must be >= 1")
    for flag in ("prefill_tp_size", "decode_tp_size"):
        if getattr(a, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not (0 < a.port < 65536):
        parser.error("--port must be in 1..65535")
    n = a.prefill + a.decode
    cores = my_cores()
    groups = split_cores(cores, n) if a.cpu_split == "disjoint" else [cores] * n
    py = sys.executable
    children: list[Child] = []

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        common = ["--host", a.host, "--dtype", a.dtype, "--disaggregation-transfer-backend", a.transfer_backend]
        if a.model_path:
            common += ["--model-path", a.model_path]
        if a.max_total_tokens:
            common += ["--max-total-tokens", str(a.max_total_tokens)]
        common += a.server_args.split()
        prefill_args: list[str] = []
        decode_urls: list[str] = []
        for i in range(n):
            role = "prefill" if i < a.prefill else "decode"
            port = a.port + 1 + i
            cmd = [py, "-m", "pdserve.cli", "serve", "--port", str(port), "--disaggregation-mode", role,
                   "--num-threads", str(len(groups[i])),
                   "--tp-size", str(a.prefill_tp_size if role == "prefill" else a.decode_tp_size), *common]
            if role == "prefill":
                boot = a.bootstrap_port_base + i
                cmd += ["--disaggregation-bootstrap-port", str(boot)]
            cpus = groups[i]
            child_env = dict(os.environ)
            if a.cpu_split == "shared" and role == "decode":
                # servers on the same cores: decode's OpenMP threads must not spin-wait on
                # cores the prefill needs (its steps are short and frequent)
                child_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            proc = subprocess.Popen(cmd, start_new_session=True, env=child_env,
                                    preexec_fn=lambda cpus=cpus: os.sched_setaffinity(0, cpus))
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
        router_cmd = [py, "-m", "pdserve.cli", "router", "--pd-disaggregation", *prefill_args,
                      *sum((["--decode", u] for u in decode_urls), []), "--host", a.host, "--port", str(a.port),
                      "--policy", a.policy]
        router = subprocess.Popen(router_cmd, start_new_session=True)
        rurl = f"http://{a.host}:{a.port}"
        children.append(Child("router", router, rurl))
        wait_healthy(rurl, router, deadline, "/readiness")
        print(f"pdserve {a.prefill}P{a.decode}D is ready at {rurl} ({a.transfer_backend} KV transfer)\n"
              f"  try: curl {rurl}/v1/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'",
              flush=True)
        while all(c.proc.poll() is None for c in children):
            time.sleep(0.5)
        dead = [c.name for c in children if c.proc.poll() is not None]
        print(f"pdserve launch: {', '.join(dead)} exited; stopping everything", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        print(f"pdserve launch: {e}", file=sys.stderr)
        return 1
    finally:
        stop_all(children)
