"""Incremental detokenization that keeps multi-byte characters intact.

Same idea as vLLM/SGLang: decode a small window (prefix_offset..end) and emit
only the part past read_offset; hold back while the text ends in U+FFFD (an
incomplete UTF-8 sequence split across tokens).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; returns the newly completed text (maybe empty)."""
        self.ids.extend(new_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end: whatever is held back (even an incomplete character)."""
        full = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta
