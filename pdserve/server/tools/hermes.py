"""The Hermes tool-call format, used by Qwen2, Qwen2.5 and Qwen3 chat templates:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, after any plain content.
"""

from __future__ import annotations

import json
import re

from pdserve.server.tools.base import ParsedOutput, Tool, ToolCall, ToolCallParser, ToolCallStream, arguments_json

START, END = "<tool_call>", "</tool_call>"
# a closed block, or an unclosed one at the very end (generation stopped before END)
_BLOCK = re.compile(re.escape(START) + r"(.*?)(?:" + re.escape(END) + r"|\Z)", re.DOTALL)


def _call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = arguments_json(obj.get("arguments", obj.get("parameters", {})))
    return None if args is None else ToolCall(obj["name"], args)


def _join(parts: list[str]) -> str | None:
    text = "".join(parts).strip()
    return text or None


class HermesToolParser(ToolCallParser):
    name = "hermes"

    def parse(self, text: str) -> ParsedOutput:
        calls: list[ToolCall] = []
        content: list[str] = []
        pos = 0
        for m in _BLOCK.finditer(text):
            call = _call(m.group(1).strip())
            content.append(text[pos : m.start()])
            if call is None:  # not a valid call: keep it as text
                content.append(m.group(0))
            else:
                calls.append(call)
            pos = m.end()
        content.append(text[pos:])
        return ParsedOutput(_join(content), calls)

    def stream(self) -> ToolCallStream:
        return _HermesStream(self)

    def forced_grammar(self, tools: list[Tool], parallel: bool) -> str:
        import xgrammar as xgr

        schema = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for t in tools
            ]
        }
        call_json = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
        call_json = re.sub(r"\broot\b", "tool_call_json", call_json)  # its root becomes a rule of ours
        more = ' ("\\n" call)*' if parallel else ""
        return f'root ::= call{more}\ncall ::= "{START}\\n" tool_call_json "\\n{END}"\n' + call_json


class _HermesStream(ToolCallStream):
    def __init__(self, parser: HermesToolParser) -> None:
        self.parser = parser
        self.pending = ""  # text not passed on: a possible START prefix, or everything from START on
        self.in_calls = False

    def feed(self, delta: str) -> str:
        if self.in_calls:
            self.pending += delta
            return ""
        text = self.pending + delta
        i = text.find(START)
        if i >= 0:
            self.in_calls = True
            out, self.pending = text[:i], text[i:]
        else:  # hold back a tail that may be the start of START
            keep = next((k for k in range(min(len(START) - 1, len(text)), 0, -1) if START.startswith(text[-k:])), 0)
            out, self.pending = text[: len(text) - keep], text[len(text) - keep :]
        return out

    def finish(self) -> ParsedOutput:
        if not self.in_calls:  # only a held-back tail that never became START: it is content
            return ParsedOutput(self.pending or None, [])
        return self.parser.parse(self.pending)
