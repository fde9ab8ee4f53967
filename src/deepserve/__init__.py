"""deepserve: an LLM inference serving system in Python."""

from deepserve.config import EngineConfig
from deepserve.engine.sequence import CompletionOutput, RequestOutput
from deepserve.entrypoints import LLM
from deepserve.errors import DeepserveError
from deepserve.sampling_params import SamplingParams

__all__ = [
           "LLM",
           "CompletionOutput",
           "DeepserveError",
           "EngineConfig",
           "RequestOutput",
           "SamplingParams",
]
__version__ = "0.1.0"
