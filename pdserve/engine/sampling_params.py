"""Moved to pdserve/sampling_params.py (the bottom layer: messages and the model use it);
this name stays for code that still imports it from here."""

from pdserve.sampling_params import GRAMMAR_KEYS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, FieldError, SamplingParams

__all__ = ["GRAMMAR_KEYS", "MAX_STOP_STRINGS", "MAX_TOP_LOGPROBS", "FieldError", "SamplingParams"]
