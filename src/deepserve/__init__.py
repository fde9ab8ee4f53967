"""deepserve: an LLM inference serving system in Python.

The names below load on first use, so importing a torch-free part of the package
(the gateway, billing, the OpenAI protocol) never loads torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepserve.config import EngineConfig
    from deepserve.engine.sequence import CompletionOutput, RequestOutput
    from deepserve.entrypoints import LLM
    from deepserve.errors import DeepserveError
    from deepserve.sampling_params import SamplingParams

_WHERE = {"LLM": "deepserve.entrypoints", "CompletionOutput": "deepserve.engine.sequence",
          "RequestOutput": "deepserve.engine.sequence", "DeepserveError": "deepserve.errors",
          "EngineConfig": "deepserve.config", "SamplingParams": "deepserve.sampling_params"}

__all__ = ["LLM", "CompletionOutput", "DeepserveError", "EngineConfig", "RequestOutput",
           "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepserve' has no attribute {name!r}")
