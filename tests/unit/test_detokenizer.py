"""Incremental detokenization keeps multi-byte characters whole."""

import pytest

from pdserve.server.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok():
    from pdserve.model.tokenizer import load_tokenizer

    return load_tokenizer(None)


def test_emoji_split_across_tokens(tok):
    text = "café 🎉 x 🎉🎉 naïve 日本語"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    pieces = [d.add([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == text
