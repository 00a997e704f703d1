"""/start_profile and /stop_profile (SGLang's names and body): a torch.profiler trace of
the scheduler's forward steps, written as `<id>-<role>.trace.json.gz` into `output_dir`,
else `$SGLANG_TORCH_PROFILER_DIR`, else /tmp (pdserve/engine/profiler.py). Admin paths
(pdserve/server/guard.py). GET works too, as in SGLang."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdserve.messages import ProfileResp
from pdserve.server.protocol import FieldError
from pdserve.server.tokenizer_manager import TokenizerManager


async def _options(request: Request) -> dict:
    """The optional JSON body of /start_profile, checked field by field."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ValueError("the body must be JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    out: dict = {}
    for key, value in body.items():
        if value is None:
            continue
        if key == "output_dir":
            if not isinstance(value, str) or not value:
                raise FieldError("output_dir must be a non-empty string", key)
            out[key] = value
        elif key == "num_steps":
            if type(value) is not int or value < 1:
                raise FieldError(f"num_steps must be an integer >= 1, got {value!r}", key)
            out[key] = value
        elif key in ("record_shapes", "with_stack"):
            if not isinstance(value, bool):
                raise FieldError(f"{key} must be true or false", key)
            out[key] = value
        elif key == "activities":  # SGLang's list; a CPU server records CPU activity only
            if not isinstance(value, list) or any(a not in ("CPU",) for a in value):
                raise FieldError(f'activities: this server records only ["CPU"], got {value!r}', key)
        else:
            raise FieldError(f"unrecognized profiling argument: {key}", key)
    return out


def _answer(resp: ProfileResp) -> JSONResponse:
    if not resp.success:  # already running / not running / bad output_dir: 400 in the usual error shape
        raise ValueError(resp.message)
    return JSONResponse({"success": True, "message": resp.message, "trace_path": resp.trace_path})


def add_profile_routes(app: FastAPI, tm: TokenizerManager) -> None:
    @app.api_route("/start_profile", methods=["GET", "POST"])
    async def start_profile(request: Request):
        return _answer(await tm.profile(True, **await _options(request)))

    @app.api_route("/stop_profile", methods=["GET", "POST"])
    async def stop_profile():
        return _answer(await tm.profile(False))
