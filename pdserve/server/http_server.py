"""HTTP front end: SGLang-style native API and the OpenAI API over one TokenizerManager.

error_handlers.py  every error in OpenAI's shape
guard.py           API keys and the body size limit (middleware)
native_api.py      /generate, health, info, load, flush_cache, abort_request, /metrics
openai_api.py      /v1/models, /v1/completions, /v1/chat/completions
responses.py       error bodies, server-sent events, streams, client disconnects
pd_fields.py       bootstrap_host / port / room of PD requests
weights_routes.py  RL weight sync, memory release, pause (docs/rl.md)
profile_routes.py  /start_profile, /stop_profile (torch profiler traces by role)
"""

from __future__ import annotations

from fastapi import FastAPI

from pdserve.server.error_handlers import add_error_handlers
from pdserve.server.guard import Guard
from pdserve.server.metrics import ServerMetrics
from pdserve.server.native_api import add_native_routes
from pdserve.server.openai_api import add_openai_routes
from pdserve.server.profile_routes import add_profile_routes
from pdserve.server.tokenizer_manager import TokenizerManager
from pdserve.server.weights_routes import add_weights_routes


def build_app(tm: TokenizerManager, metrics: ServerMetrics, served_model_name: str, model_path: str) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    app.state.tm = tm
    add_error_handlers(app)
    app.add_middleware(
        Guard, api_key=tm.args.api_key, admin_api_key=tm.args.admin_api_key, max_body=tm.args.max_payload_size
    )
    add_native_routes(app, tm, metrics, served_model_name, model_path)
    add_openai_routes(app, tm, served_model_name, model_path)
    add_weights_routes(app, tm)
    add_profile_routes(app, tm)
    return app
