"""Tool calling for /v1/chat/completions: parsers (base.py, registry) and request
handling (request.py). docs/api.md, "Tool calling"."""
