"""A request body as a JSON object, for the HTTP server and the router alike."""

from __future__ import annotations

import json


class BadRequest(ValueError):
    """The client's body is unusable (answered 400, never retried)."""


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON body: {e}") from None
    except RecursionError:
        raise BadRequest("the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return body
