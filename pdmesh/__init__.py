"""pdmesh: prefill/decode-disaggregated LLM serving.

`pdmesh.Engine` and `pdmesh.SamplingParams` are imported lazily so that light modules
(config, allocator) load without torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "Engine": "pdmesh.runtime.engine",
    "RequestOutput": "pdmesh.runtime.engine",
    "SamplingParams": "pdmesh.runtime.sampling_params",
    "EngineConfig": "pdmesh.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pdmesh' has no attribute {name!r}")


__all__ = list(_LAZY)
