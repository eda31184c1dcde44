"""The inference engine: continuous batching over a paged KV cache.

Modules: request.py (`Request`, its checks and stop handling, the engine's errors), scheduler.py and
pages.py (admission, page allocation, prefix caching, chunked prefill, preemption: plain Python, no JAX),
steps.py (the one pure device step), programs.py (its jitted programs, the pool's format, the token
widths, `engine_programs` for compile-check), metrics.py (counters in fixed memory), core.py (`Engine`:
the host loop).
"""

from inference.engine.core import Engine
from inference.engine.request import TOP_LOGPROBS, EngineError, EngineFull, EngineStopped, Request

__all__ = ["TOP_LOGPROBS", "Engine", "EngineError", "EngineFull", "EngineStopped", "Request", "cache_length"]


def cache_length(max_model_len: int) -> int:
    """max_model_len rounded up to a multiple of 16 (the default page size)."""
    return -(-max_model_len // 16) * 16
