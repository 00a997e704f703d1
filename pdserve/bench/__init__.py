"""`pdserve bench`: a serving benchmark client for pdserve, SGLang and OpenAI-compatible servers.

A client only: nothing here imports torch or the engine. See docs/bench.md.
"""
