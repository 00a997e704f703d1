"""SGLang's weight-sync, memory and pause endpoints (issue #15), on every pdserve server.

Request fields are SGLang's. They are admin endpoints (pdserve/server/guard.py: with
--admin-api-key or --api-key set, they need it). The scheduler process does the work
(pdserve/engine/weights_control.py); these handlers check the fields' types and forward.

/update_weights_from_tensor differs from SGLang in one way: SGLang's
`serialized_named_tensors` are pickled tensors, and pdserve never unpickles bytes from a
socket, so here each entry is a base64-encoded safetensors file (`safetensors.torch.save`)
of the whole model's tensors: one entry per tensor-parallel rank as in SGLang, or one that
every rank reads.

With --tp-size > 1 every call reaches every tp rank (pdserve/engine/tp_weights.py).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pdserve.messages import (
    AdminResp,
    ContinueGenerationReq,
    DestroyWeightsGroupReq,
    GetWeightsByNameReq,
    InitWeightsGroupReq,
    PauseGenerationReq,
    ReleaseMemoryReq,
    ResumeMemoryReq,
    UpdateWeightsFromDiskReq,
    UpdateWeightsFromDistributedReq,
    UpdateWeightsFromTensorReq,
)
from pdserve.json_body import parse_body
from pdserve.server.tokenizer_manager import TokenizerManager

ABORT_MESSAGE = "aborted: the server's weights are being updated (abort_all_requests)"


def _field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise ValueError(f"{name} is required")
        return None if default is ... else default
    value = body[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ValueError(f"{name} must be {getattr(kind, '__name__', kind)}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{name} must be {names}, got {type(value).__name__}")
    return value


def _str_list(body: dict, name: str, required: bool = True) -> list[str] | None:
    value = _field(body, name, list, required=required)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return value


async def _body(request: Request) -> dict:
    """The JSON body; an empty body is {} (SGLang's clients send none for some calls)."""
    raw = await request.body()
    if not raw.strip():
        return dict(request.query_params)
    return parse_body(raw)


def _answer(resp: AdminResp) -> JSONResponse:
    body = {"success": resp.success, "message": resp.message}
    if resp.data is not None:
        body["data"] = resp.data
    return JSONResponse(body, status_code=200 if resp.success else resp.status_code)


async def _update(tm: TokenizerManager, body: dict, make) -> JSONResponse:
    abort = _field(body, "abort_all_requests", bool, False)
    flush = _field(body, "flush_cache", bool, True)
    if abort:
        await tm.abort_all(ABORT_MESSAGE)
    return _answer(await tm.admin_call(lambda cid: make(cid, flush, abort)))


def add_weights_routes(app: FastAPI, tm: TokenizerManager) -> None:
    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request):
        body = await _body(request)
        msg = dict(
            master_address=_field(body, "master_address", str, required=True),
            master_port=_field(body, "master_port", int, required=True),
            rank_offset=_field(body, "rank_offset", int, required=True),
            world_size=_field(body, "world_size", int, required=True),
            group_name=_field(body, "group_name", str, "weight_update_group"),
            backend=_field(body, "backend", str, "gloo"),
        )
        if not 0 < msg["master_port"] < 65536:
            raise ValueError("master_port must be in 1..65535")
        for key in ("rank_offset", "world_size"):  # ints msgpack can carry to the scheduler
            if not 0 <= msg[key] < 2**31:
                raise ValueError(f"{key} must be in 0..2**31-1")
        return _answer(await tm.admin_call(lambda cid: InitWeightsGroupReq(cid, **msg)))

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request):
        body = await _body(request)
        name = _field(body, "group_name", str, "weight_update_group")
        return _answer(await tm.admin_call(lambda cid: DestroyWeightsGroupReq(cid, name)))

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        body = await _body(request)
        names = _str_list(body, "names")
        dtypes = _str_list(body, "dtypes")
        shapes = _field(body, "shapes", list, required=True)
        if not all(
            isinstance(s, list) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31 for x in s)
            for s in shapes
        ):
            raise ValueError("shapes must be a list of lists of non-negative integers")
        group = _field(body, "group_name", str, "weight_update_group")
        load_format = _field(body, "load_format", str, None)
        return await _update(
            tm,
            body,
            lambda cid, flush, abort: UpdateWeightsFromDistributedReq(
                cid, names, dtypes, shapes, group, flush, abort, load_format
            ),
        )

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request):
        body = await _body(request)
        entries = _field(body, "serialized_named_tensors", list, required=True)
        if not entries or not all(isinstance(e, str) for e in entries):
            raise ValueError(
                "serialized_named_tensors must be a list of base64 strings (safetensors files: "
                "one per tensor-parallel rank, or one for all ranks)"
            )
        data = []
        for i, e in enumerate(entries):
            try:
                data.append(base64.b64decode(e, validate=True))
            except (binascii.Error, ValueError):
                raise ValueError(f"serialized_named_tensors[{i}] is not valid base64") from None
        load_format = _field(body, "load_format", str, None)
        if load_format not in (None, "safetensors"):
            raise ValueError("load_format must be null or 'safetensors'")
        return await _update(tm, body, lambda cid, flush, abort: UpdateWeightsFromTensorReq(cid, data, flush, abort))

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        body = await _body(request)
        path = _field(body, "model_path", str, required=True)
        return await _update(tm, body, lambda cid, flush, abort: UpdateWeightsFromDiskReq(cid, path, flush, abort))

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(request: Request):
        body = await _body(request)
        name = _field(body, "name", str, required=True)
        size = body.get("truncate_size", 100)
        try:  # a query parameter arrives as text; inf, nan and 1e308 must not reach msgpack
            size = min(max(int(size), 0), 2**31 - 1)
        except (TypeError, ValueError, OverflowError):
            raise ValueError("truncate_size must be an integer") from None
        resp = await tm.admin_call(lambda cid: GetWeightsByNameReq(cid, name, size))
        if not resp.success:
            return _answer(resp)
        return JSONResponse(resp.data)

    @app.post("/release_memory_occupation")
    async def release_memory_occupation(request: Request):
        body = await _body(request)
        tags = _str_list(body, "tags", required=False)
        return _answer(await tm.admin_call(lambda cid: ReleaseMemoryReq(cid, tags)))

    @app.post("/resume_memory_occupation")
    async def resume_memory_occupation(request: Request):
        body = await _body(request)
        tags = _str_list(body, "tags", required=False)
        return _answer(await tm.admin_call(lambda cid: ResumeMemoryReq(cid, tags)))

    @app.post("/pause_generation")
    async def pause_generation():
        return _answer(await tm.admin_call(PauseGenerationReq))

    @app.post("/continue_generation")
    async def continue_generation():
        return _answer(await tm.admin_call(ContinueGenerationReq))
