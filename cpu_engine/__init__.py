"""A numpy inference engine for Llama-family checkpoints: the CPU stand-in for TensorRT-LLM.

No Triton imports here: the Triton generation model drives `Engine` from its scheduler thread, and
benchmarks and tests drive it directly.
"""

from cpu_engine.config import ModelConfig
from cpu_engine.engine import Engine, EngineLimits, EngineStats, GenerationResult
from cpu_engine.errors import CheckpointError, EngineError, EngineOverloaded, RequestRejected, RequestTooLarge
from cpu_engine.model import LlamaModel
from cpu_engine.sampling import SamplingParams
from cpu_engine.sequence import FinishReason, GenerationRequest, TokenEvent

__all__ = [
    "CheckpointError",
    "Engine",
    "EngineError",
    "EngineLimits",
    "EngineOverloaded",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "LlamaModel",
    "ModelConfig",
    "RequestRejected",
    "RequestTooLarge",
    "SamplingParams",
    "TokenEvent",
]
