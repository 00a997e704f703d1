"""The one admission check shared by the front end, the scheduler and the PD queues."""

from __future__ import annotations


def kv_pool_fit_error(num_prompt_tokens: int, pool_tokens: int) -> str | None:
    """Why a prompt cannot run on a KV pool of `pool_tokens` tokens, or None if it fits:
    the prompt and its first output token must fit the whole pool at once."""
    if num_prompt_tokens + 1 <= pool_tokens:
        return None
    return (
        f"prompt of {num_prompt_tokens} tokens exceeds the KV pool of {pool_tokens} tokens "
        f"(the prompt and one output token must fit)"
    )
