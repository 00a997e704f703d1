"""`pdserve kvstore`: the KV cache data service servers share (`--kv-store URL`).

pdserve kvstore                      # embedded: http://127.0.0.1:9015, 4 GiB LRU
pdserve kvstore --backend mooncake   # starts mooncake_master: mooncake://127.0.0.1:9015
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys


def build_parser():
    from pdserve.cli_parser import Parser

    p = Parser(prog="pdserve kvstore", description="KV cache data service shared by servers (docs/kvstore.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 only behind a firewall)")
    p.add_argument("--port", type=int, default=9015, help="service port (mooncake: the master's RPC port)")
    p.add_argument(
        "--backend",
        choices=("embedded", "mooncake"),
        default="embedded",
        help="embedded: a pdserve process holding pages in RAM (LRU); mooncake: Mooncake Store's "
        "master (clients contribute the memory)",
    )
    p.add_argument("--capacity-gb", type=float, default=4.0, help="embedded: bytes held before LRU eviction")
    return p


def _mooncake(a) -> int:
    exe = shutil.which("mooncake_master") or os.path.join(os.path.dirname(sys.executable), "mooncake_master")
    if not os.path.exists(exe):
        from pdserve.cli_parser import fail

        return fail(
            "pdserve kvstore",
            "--backend mooncake: mooncake_master not found; pip install "
            "'pdserve[mooncake]' (and apt-get install libibverbs1)",
        )
    proc = subprocess.Popen([exe, f"-rpc_port={a.port}", f"-rpc_address={a.host}", f"-metrics_port={a.port + 1}"])
    print(
        f"pdserve kvstore (Mooncake Store master) at mooncake://{a.host}:{a.port}; "
        f"servers: --kv-store mooncake://{a.host}:{a.port}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    signal.signal(signal.SIGHUP, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def main(argv: list[str]) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not (0 < a.port < 65536):
        p.error(f"--port must be in 1..65535, got {a.port}")
    if a.capacity_gb <= 0:
        p.error(f"--capacity-gb must be > 0, got {a.capacity_gb}")
    if a.backend == "mooncake":
        return _mooncake(a)
    from aiohttp import web

    from pdserve.kvstore.memory import MemoryStore
    from pdserve.kvstore.service import build_app

    store = MemoryStore(int(a.capacity_gb * (1 << 30)))
    print(
        f"pdserve kvstore (embedded, {a.capacity_gb:g} GiB LRU) at http://{a.host}:{a.port}; "
        f"servers: --kv-store http://{a.host}:{a.port}",
        flush=True,
    )
    web.run_app(build_app(store), host=a.host, port=a.port, print=None, handle_signals=True)
    return 0
