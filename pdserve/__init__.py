"""pdserve: a prefill/decode disaggregated LLM serving engine.

`pdserve.Engine` and `pdserve.PDEngine` are imported lazily so that light users (the benchmark client, the
router) never pay for torch.
"""

__version__ = "0.1.0"

__all__ = ["Engine", "PDEngine", "__version__"]


def __getattr__(name: str):
    if name == "Engine":
        from pdserve.server.engine import Engine

        return Engine
    if name == "PDEngine":
        from pdserve.server.pd_engine import PDEngine

        return PDEngine
    raise AttributeError(name)
