"""--chat-template (a file or the template text) replaces the model's template in chat requests."""

import pytest

from pdserve.config import ServerArgs
from pdserve.model.tokenizer import load_tokenizer
from pdserve.server.tokenizer_manager import TokenizerManager

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def render(chat_template):
    tm = TokenizerManager(ServerArgs(chat_template=chat_template))
    tm.tokenizer = load_tokenizer(None)
    tm.chat_template = tm._chat_template()
    return tm.tokenizer.decode(tm.apply_chat_template([{"role": "user", "content": "hi"}]))


def test_chat_template_text_and_file(tmp_path):
    assert render(TEMPLATE) == "<user>hi"
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE.replace("<", "["))
    assert render(str(f)) == "[user>hi"
    assert "<|im_start|>" in render(None)  # the model's own


def test_chat_template_neither_file_nor_template():
    with pytest.raises(ValueError, match="--chat-template"):
        ServerArgs(chat_template="missing.jinja")
