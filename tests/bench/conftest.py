"""Fixtures for the benchmark client's tests: a fake streaming server and tokenizer."""

from __future__ import annotations

import pytest

from fake_server import FakeConfig, FakeServer, WordTokenizer


@pytest.fixture
def word_tokenizer() -> WordTokenizer:
    return WordTokenizer()


@pytest.fixture
def fake_server():
    """A fake server with the default schedule: TTFT 200 ms, then one token per 40 ms."""
    with FakeServer(FakeConfig()) as srv:
        yield srv
