"""Tool-call parsers by name (--tool-call-parser; base.py: ToolCallParser)."""

from __future__ import annotations

from pdserve.server.tools.base import ToolCallParser
from pdserve.server.tools.hermes import HermesToolParser

_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolParser,
    "qwen25": HermesToolParser,
    "qwen": HermesToolParser,
    "qwen3": HermesToolParser,
}


def parser_names() -> list[str]:
    return sorted(_PARSERS)


def get_parser(name: str) -> ToolCallParser:
    if name not in _PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose from {', '.join(parser_names())}")
    return _PARSERS[name]()
