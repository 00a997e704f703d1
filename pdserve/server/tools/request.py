"""The tool fields of a chat request (`tools`, `tool_choice`, `parallel_tool_calls`),
validated into a ToolPlan: what the chat template renders, how the output is parsed,
and the grammar that forces a call when the client requires one."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pdserve.server.protocol import FieldError
from pdserve.server.tools.base import Tool, ToolCallParser
from pdserve.server.tools.registry import get_parser, parser_names

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    tools: list[Tool]  # rendered into the prompt by the chat template
    parser: ToolCallParser  # parses the output into content + tool_calls
    grammar: str | None  # EBNF forcing calls ("required" or a named function), else None


def _tools(raw) -> list[Tool]:
    if not isinstance(raw, list):
        raise FieldError("tools must be a list of {type: function, function: {...}} objects", "tools")
    out: list[Tool] = []
    for i, t in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise FieldError(
                f'{where} must be {{type: "function", function: {{name, description, parameters}}}}', where
            )
        for k in t:
            if k not in ("type", "function"):
                raise FieldError(f"{where}.{k} is not supported", f"{where}.{k}")
        fn = t["function"]
        for k in fn:
            if k not in ("name", "description", "parameters", "strict"):
                raise FieldError(f"{where}.function.{k} is not supported", f"{where}.function.{k}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise FieldError(f"{where}.function.name must be 1-64 letters, digits, _ or -", f"{where}.function.name")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise FieldError(f"{where}.function.description must be a string", f"{where}.function.description")
        params = fn.get("parameters", _EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise FieldError(
                f"{where}.function.parameters must be a JSON Schema object", f"{where}.function.parameters"
            )
        if fn.get("strict") not in (None, True, False):
            raise FieldError(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
        if any(o.name == name for o in out):
            raise FieldError(f"{where}.function.name {name!r} is declared twice", f"{where}.function.name")
        out.append(Tool(name, desc, params))
    return out


def _choice(raw, tools: list[Tool]) -> str | Tool:
    """ "none" | "auto" | "required" | the named tool."""
    if raw is None:
        return "auto" if tools else "none"
    if raw in ("none", "auto", "required"):
        return raw
    fn = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise FieldError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    for t in tools:
        if t.name == name:
            return t
    raise FieldError(f"tool_choice names {name[:100]!r}, which is not in tools", "tool_choice")


def plan_tools(body: dict, template: str, parser_name: str | None, served: str) -> ToolPlan | None:
    """None when the request uses no tools (none given, or tool_choice "none")."""
    raw = body.get("tools")
    tools = _tools(raw) if raw is not None else []
    parallel = body.get("parallel_tool_calls")
    if parallel not in (None, True, False):
        raise FieldError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    choice = _choice(body.get("tool_choice"), tools)
    if not tools:
        if choice != "none":
            raise FieldError("tool_choice needs tools", "tool_choice")
        return None
    if choice == "none":  # the model must not call: the tools are not shown to it
        return None
    if "tools" not in template:
        raise FieldError(
            f"tools are not supported with the chat template of the served model ({served}): it does "
            "not render tools; start the server with --chat-template set to one that does "
            '(docs/api.md, "Tool calling")',
            "tools",
        )
    if parser_name is None:
        raise FieldError(
            "tools need a tool-call parser for the served model's format; start the server with "
            f"--tool-call-parser ({', '.join(parser_names())})",
            "tools",
        )
    parser = get_parser(parser_name)
    grammar = None
    if choice == "required" or isinstance(choice, Tool):
        for k in ("response_format", "regex", "ebnf"):
            if body.get(k) not in (None, {"type": "text"}):
                raise FieldError(f"{k} cannot be combined with a tool_choice that forces a call", k)
        forced = [choice] if isinstance(choice, Tool) else tools
        # several calls only when asked for explicitly (OpenAI's default is true): small
        # models repeat a forced call until max_tokens when the grammar lets them
        grammar = parser.forced_grammar(forced, parallel=parallel is True and not isinstance(choice, Tool))
    return ToolPlan(tools, parser, grammar)
