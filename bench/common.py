"""Shared benchmark helpers: timing, machine description, matmul rate, the 64M reference checkpoint."""

from __future__ import annotations

import os
import platform
import statistics
import time


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def median_seconds(fn, *, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of fn() (fn must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_rate(m: int, k: int, n: int, *, calls: int = 1, repeats: int = 5) -> float:
    """FLOP/s of this machine's jitted float32 matmul [m, k] x [k, n]: the best of `repeats` timings of
    `calls` calls each."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            mm(a, b).block_until_ready()
        best = min(best, (time.perf_counter() - t) / calls)
    return 2 * m * k * n / best


def bench_checkpoint(path: str, seed: int = 0) -> str:
    """The 64M-parameter benchmark model as a float32 Hugging Face directory (made once)."""
    from jaxmodel.config import MistralConfig
    from jaxmodel.parity import make_hf_checkpoint

    if not os.path.exists(os.path.join(path, "config.json")):
        make_hf_checkpoint(path, MistralConfig.bench_64m(), seed=seed)
    return path
