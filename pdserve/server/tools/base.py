"""Tool calling: the parser interface (registry.py: the parsers by name).

A tool-call parser knows one model family's tool-call format. It turns generated text
into (content, tool calls), incrementally when streaming, and writes the grammar that
forces a call in that format when `tool_choice` is "required" or names a function
(structured output, pdserve/engine/grammar.py). registry.py names them as
SGLang's and vLLM's `--tool-call-parser` do.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tool:
    """One entry of the request's `tools`, validated."""

    name: str
    description: str | None
    parameters: dict  # a JSON Schema object

    def as_openai(self) -> dict:
        """The shape chat templates render (OpenAI's tool object)."""
        fn: dict = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's wire shape)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self, index: int | None = None) -> dict:
        d: dict = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # the text outside the calls; None when there is none
    calls: list[ToolCall]


class ToolCallStream(ABC):
    """Per-choice streaming state: content is passed through as it arrives, a call is
    held back until it is complete (clients get each call whole, at the end)."""

    @abstractmethod
    def feed(self, delta: str) -> str:
        """New generated text in; the content that can be sent now out."""

    @abstractmethod
    def finish(self) -> ParsedOutput:
        """At the end: content still held back, and the calls."""


class ToolCallParser(ABC):
    name: str = ""

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """Whole generated text -> content and calls. Text that looks like a call but
        does not parse stays content (nothing is dropped)."""

    @abstractmethod
    def stream(self) -> ToolCallStream: ...

    @abstractmethod
    def forced_grammar(self, tools: list[Tool], parallel: bool) -> str:
        """EBNF (xgrammar) for output that is only tool calls, at least one, each naming
        one of `tools` with arguments valid against its schema; one call if not parallel."""


# Model architectures whose own chat templates use a registered format.
ARCH_PARSERS = {"qwen2": "qwen25", "qwen3": "qwen3"}


def arguments_json(args) -> str | None:
    """A call's arguments as OpenAI's JSON text, or None when they are not an object."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return json.dumps(args, ensure_ascii=False)
