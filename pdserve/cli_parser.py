"""The argparse parser every `pdserve` command uses, and its one-line error exit. Only the
standard library: low layers (`pdserve kvstore`) import it without the rest of pdserve."""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`pdserve serve: error: --flag: why; fix`, exit 2)
    and defaults shown in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def fail(prog: str, message: str) -> int:
    """A start-up failure: one line on stderr, exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2
