"""Tokenizer and chat template from a GGUF file or a Hugging Face directory.

Only `transformers`/`tokenizers` are imported here (no torch model code), so the
benchmark client can count tokens with the served model's tokenizer.
"""

from __future__ import annotations

import os
from functools import lru_cache

from pdserve.model.paths import resolve_model_path


@lru_cache(maxsize=4)
def load_tokenizer(model_path: str | None = None, tokenizer_path: str | None = None):
    """Returns a `transformers.PreTrainedTokenizerFast` (with `chat_template`)."""
    import transformers

    transformers.logging.set_verbosity_error()
    path = resolve_model_path(tokenizer_path or model_path)
    from transformers import AutoTokenizer

    if os.path.isfile(path) and path.endswith(".gguf"):
        # Converting a GGUF vocabulary takes ~10 s; cache the converted tokenizer
        # (same key scheme as the dequantized weights).
        from pdserve.model.paths import cache_dir, file_key

        cached = os.path.join(cache_dir(), f"gguf-{file_key(path)}-tokenizer")
        if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(cached)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
        if tok.chat_template is None:
            tok.chat_template = _gguf_chat_template(path)
        tmp = cached + f".tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        if not os.path.exists(cached):
            os.replace(tmp, cached)
        return tok
    return AutoTokenizer.from_pretrained(path)


def _gguf_chat_template(path: str) -> str | None:
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("tokenizer.chat_template")
    return None if field is None else field.contents()
