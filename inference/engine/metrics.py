"""The engine's counters in fixed memory: `Metrics` (tokens/s from a ring of 0.1 s buckets over the last
10 s, TTFT from the last 1000 requests, running totals), whether or not anyone reads them (a list of every
token's time would grow ~64 bytes a token in a server nobody scrapes); and compile counting
(`listen_for_compiles`, `counting`): one process-wide `jax.monitoring` listener adds each XLA compilation
to the engine whose step or warm-up runs in the compiling thread (listeners are global: one per engine
would pile up and count every engine's compiles in each).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time

import jax

RATE_WINDOW, RATE_BUCKETS = 10.0, 100  # tokens/s over the last 10 s, counted in 0.1 s buckets
TTFT_SAMPLES = 1000

_COMPILING = threading.local()  # .engine: the engine whose step or warm-up runs in this thread
_LISTENING = threading.Lock()
_listener_registered = False


def _on_duration_event(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        engine = getattr(_COMPILING, "engine", None)
        if engine is not None:
            engine.compiles += 1


def listen_for_compiles() -> None:
    """Registers the compile listener, once per process."""
    global _listener_registered
    with _LISTENING:
        if not _listener_registered:
            jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
            _listener_registered = True


@contextlib.contextmanager
def counting(engine):
    """XLA compilations in this thread inside the block count in `engine.compiles`."""
    outer = getattr(_COMPILING, "engine", None)
    _COMPILING.engine = engine
    try:
        yield
    finally:
        _COMPILING.engine = outer


class Metrics:
    """Counters the engine's thread updates; `snapshot` reads them (a dict of plain numbers)."""

    def __init__(self):
        self.generated_tokens = 0
        self.finished_requests = 0
        self.aborted_requests = 0
        self.failed_requests = 0  # finished with finish_reason "error"
        self.steps = 0  # device steps
        self.decode_steps = 0  # device steps that decoded at least one sequence
        self.prefill_calls = 0  # device steps that carried at least one prompt chunk
        self.prefill_tokens = 0  # prompt tokens computed (recomputed after preemption included; padding not)
        self.prompt_tokens = 0  # prompt tokens of the requests admitted
        self._rate_counts = [0] * RATE_BUCKETS  # generated tokens per tick, a ring of the last RATE_WINDOW s
        self._rate_ticks = [-1] * RATE_BUCKETS  # the tick each bucket counts
        self.ttft: collections.deque = collections.deque(maxlen=TTFT_SAMPLES)  # the last requests' TTFT

    def count_token(self, now: float) -> None:
        self.generated_tokens += 1
        tick = int(now * RATE_BUCKETS / RATE_WINDOW)
        i = tick % RATE_BUCKETS
        if self._rate_ticks[i] != tick:  # the bucket held a tick RATE_WINDOW ago or more: reuse it
            self._rate_ticks[i], self._rate_counts[i] = tick, 0
        self._rate_counts[i] += 1

    def count_finish(self, reason: str) -> None:
        self.finished_requests += 1
        self.aborted_requests += reason == "abort"
        self.failed_requests += reason == "error"

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens generated in the last RATE_WINDOW seconds (to 0.1 s: the ticks after the one RATE_WINDOW
        ago), per second."""
        tick = int((time.perf_counter() if now is None else now) * RATE_BUCKETS / RATE_WINDOW)
        recent = sum(n for n, t in zip(self._rate_counts, self._rate_ticks) if tick - RATE_BUCKETS < t <= tick)
        return recent / RATE_WINDOW

    def snapshot(self) -> dict:
        ttft = sorted(self.ttft)
        pick = lambda q: round(ttft[min(int(q * len(ttft)), len(ttft) - 1)], 4) if ttft else None  # noqa: E731
        return {"tokens_per_second": round(self.tokens_per_second(), 2),
                "generated_tokens_total": self.generated_tokens, "finished_requests_total": self.finished_requests,
                "aborted_requests_total": self.aborted_requests, "failed_requests_total": self.failed_requests,
                "ttft_seconds_p50": pick(0.5), "ttft_seconds_p99": pick(0.99), "steps_total": self.steps,
                "decode_steps_total": self.decode_steps, "prefill_calls_total": self.prefill_calls,
                "prefill_tokens_total": self.prefill_tokens, "prompt_tokens_total": self.prompt_tokens}
