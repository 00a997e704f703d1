"""The router: pairs prefill and decode servers (PD mode) or balances plain servers.

Light on purpose (aiohttp + prometheus-client, no torch). Wire-compatible with
SGLang's `sglang_router`; see docs/router.md.

    from pdserve.router import RouterConfig, RouterThread, PrefillSpec
    with RouterThread(RouterConfig(pd_disaggregation=True, port=0,
                                   prefill=(PrefillSpec("http://127.0.0.1:30000", 8998),),
                                   decode=("http://127.0.0.1:30001",))) as rt:
        ...  # rt.url
"""

from pdserve.router.config import PrefillSpec, RouterConfig

__all__ = ["PrefillSpec", "RouterConfig", "RouterThread", "serve"]


def __getattr__(name: str):
    if name in ("RouterThread", "serve"):
        from pdserve.router import serve as _serve

        return getattr(_serve, name)
    raise AttributeError(name)
