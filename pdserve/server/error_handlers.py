"""Every error the HTTP server answers, in one (OpenAI's) shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.server.guard import BodyTooLarge
from pdserve.server.responses import ClientDisconnected, ModelNotFound, error_response
from pdserve.server.tokenizer_manager import SchedulerDied

logger = logging.getLogger("pdserve.http")


async def bad_request(_: Request, e: ValueError):
    if isinstance(e, ModelNotFound):
        return error_response(str(e), 404, "NotFoundError", param="model", code="model_not_found")
    return error_response(str(e), 400, param=getattr(e, "param", None))


async def http_error(request: Request, e: StarletteHTTPException):
    # unknown routes and wrong methods in the same shape as every other error
    msg = e.detail if isinstance(e.detail, str) else str(e.detail)
    if e.status_code == 404:
        msg = f"{request.method} {request.url.path}: no such route (see /v1/models, /v1/chat/completions)"
    kinds = {404: "NotFoundError", 405: "MethodNotAllowed"}
    return error_response(msg, e.status_code, kinds.get(e.status_code, "Error"))


async def client_gone(request: Request, e: ClientDisconnected):
    logger.info("client disconnected from %s %s; request aborted", request.method, request.url.path)
    return Response(status_code=499)  # nobody reads it: nginx's "client closed request"


async def scheduler_died(_: Request, e: SchedulerDied):
    return error_response(str(e), 503, "ServiceUnavailable")


async def too_large(_: Request, e: BodyTooLarge):
    return error_response(str(e), 413, "RequestTooLarge")


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ValueError, bad_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnected, client_gone)
    app.add_exception_handler(SchedulerDied, scheduler_died)
    app.add_exception_handler(BodyTooLarge, too_large)
