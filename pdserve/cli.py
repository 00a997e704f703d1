"""`pdserve <command> ...`: one entry point, one module per command.

Each command module exposes `main(argv: list[str]) -> int` and owns its argparse
parser, so importing the CLI does not import torch (the router and the benchmark
client stay light).
"""

from __future__ import annotations

import importlib
import sys

from pdserve.cli_parser import Parser, fail  # noqa: F401  (the commands' parser and error exit)

COMMANDS = {
    "serve": ("pdserve.server.serve_cli", "serve one engine (HTTP + scheduler)"),
    "router": ("pdserve.router.cli", "the (PD) router in front of servers"),
    "launch": ("pdserve.launch.cli", "a whole xPyD deployment on one machine"),
    "bench": ("pdserve.bench.cli", "serving benchmark client"),
    "kvstore": ("pdserve.kvstore.cli", "KV cache data service shared by servers"),
}


def _usage() -> str:
    lines = ["usage: pdserve <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`pdserve <command> --help` for the options of a command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from pdserve import __version__

        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"pdserve: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
