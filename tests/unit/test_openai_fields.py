"""OpenAI request fields: `repetition_penalty` is accepted as the no-op 1.0 that
`vllm bench serve` sends with every request, and refused (naming it) otherwise."""

from __future__ import annotations

import pytest

from pdserve.server.protocol import FieldError, check_openai_fields, openai_sampling


@pytest.mark.parametrize("chat", [False, True])
def test_repetition_penalty_one_is_accepted(chat):
    body = {"prompt": "x"} if not chat else {"messages": [{"role": "user", "content": "x"}]}
    for v in (1.0, 1, None):
        check_openai_fields({**body, "repetition_penalty": v}, chat)
    sp, _ = openai_sampling({**body, "repetition_penalty": 1.0, "max_tokens": 4}, 16, chat)
    assert sp.max_new_tokens == 4
    for v in (1.2, 0, True, "1"):
        with pytest.raises(FieldError, match="repetition_penalty is supported only as 1.0") as e:
            check_openai_fields({**body, "repetition_penalty": v}, chat)
        assert e.value.param == "repetition_penalty"
