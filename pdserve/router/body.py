"""What the router reads from a request body: the routing key and the batch size.

The router never tokenizes: the routing key is text (or token ids written as text),
enough for the cache-aware policy's approximate prefix trees.
"""

from __future__ import annotations

from typing import Any

from pdserve.json_body import BadRequest

# Routing keys are cut here: prefix matching needs a prefix, not a whole book.
MAX_KEY_CHARS = 32_768


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _ids_text(ids: list) -> str:
    # one trailing space per id keeps "prefix of ids" == "prefix of text" at id boundaries
    return "".join(f"{t} " for t in ids)


def routing_key(body: dict, path: str) -> str | None:
    """The text a prefix-aware policy matches on (the first prompt of a batch)."""
    key: str | None = None
    if path == "/v1/chat/completions":
        msgs = body.get("messages")
        if isinstance(msgs, list):
            parts = []
            for m in msgs:
                if not isinstance(m, dict):
                    continue
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(
                        p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                    )
                parts.append(f"{m.get('role')}: {content if isinstance(content, str) else ''}\n")
            key = "".join(parts)
    else:
        v = body.get("prompt") if path == "/v1/completions" else body.get("text")
        if v is None and path == "/generate":
            v = body.get("input_ids")
        if isinstance(v, list) and v and not _is_ids(v):
            v = v[0]  # batch: route on the first prompt
        if isinstance(v, str):
            key = v
        elif _is_ids(v) and v:
            key = _ids_text(v)
    return key[:MAX_KEY_CHARS] if key else None


def batch_size(body: dict, path: str) -> int | None:
    """Number of prompts of a batched request, None for a single one (SGLang's rule:
    `text` a list of strings, `input_ids` a list of lists, `prompt` a list of
    strings or of token lists; a flat token list is one prompt). Parallel sampling
    (`n > 1`) is not a batch: the server expands one room into room + i."""
    if path == "/generate":
        text, ids = body.get("text"), body.get("input_ids")
        if isinstance(text, list):
            if not text:
                raise BadRequest("text is an empty list")
            return len(text)
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            return len(ids)
        if isinstance(ids, list) and not ids:
            raise BadRequest("input_ids is an empty list")
        return None
    if path == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if not prompt:
                raise BadRequest("prompt is an empty list")
            return None if _is_ids(prompt) else len(prompt)
    return None
