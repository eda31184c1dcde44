"""Pieces of bench/accelerator.py: datasheet peaks, the chip's measured ceilings, timing, free device
memory, and one decoder layer's forward+backward in JAX and in PyTorch (timed alternately).

Inside: `DATASHEET` / `datasheet(device_kind)`, `matmul_ceiling`, `copy_ceiling`, `timed` (first call and
median of the timed calls), `device_memory`, `failure` (an exception as the short line a table shows),
`layer_vs_torch` (the PyTorch comparison).

Timing: every timed function blocks until its result is ready; the first call (compile included) is
timed on its own, then `warmup` more calls are discarded and the median of `repeats` calls is taken.
The ceilings time back-to-back calls and block once (dispatch overlaps the device's work), best of a
few rounds: a ceiling is the best the chip did, so fractions against it are the conservative ones.

The PyTorch comparison runs what both sides compute identically: one decoder layer, forward and backward
(gradients of the parameters and of the input) of the sum of its float32-cast output, bf16 weights and
activations, one sequence of T tokens, causal. Ours is `jaxmodel.model.DecoderLayer` (the project's layer,
with the attention implementation of the row), theirs transformers' `MistralDecoderLayer` with sdpa
(torch.compile on CUDA unless told not to; eager when compiling fails, which is recorded). Calls
alternate (ours, theirs, ours, ...) so a drifting clock or a neighbour's load hits both alike. torch and
transformers are imported only here, when the comparison runs: the rest needs neither.
"""

from __future__ import annotations

import re
import statistics
import time

import jax
import jax.numpy as jnp
from common import median_seconds
from flax import nnx

from jaxmodel.masks import AttentionMask
from jaxmodel.model import DecoderLayer, rope_cos_sin

# device_kind word -> (dense bf16 FLOP/s, memory bandwidth in bytes/s), public datasheets. First match wins
# (a whole-word match: "L4" is not "L40S"); an unknown device gets "n/a".
DATASHEET = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM (device_kind "NVIDIA H100 80GB HBM3")
    ("H200", 989e12, 4.8e12),
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100-PCIE-40GB", 312e12, 1.555e12),
    ("A100", 312e12, 2.0e12),  # 80 GB
    ("L4", 121e12, 0.3e12),
    ("T4", 65e12, 0.32e12),
    ("TPU v5 lite", 197e12, 0.82e12),  # v5e
    ("TPU v5e", 197e12, 0.82e12),
    ("TPU v5p", 459e12, 2.77e12),
    ("TPU v5", 459e12, 2.77e12),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12, 1.64e12),  # v6e
    ("TPU v6e", 918e12, 1.64e12),
)


def datasheet(device_kind: str) -> tuple[float | None, float | None]:
    """(peak bf16 FLOP/s, peak bytes/s) of a device kind, (None, None) when the table does not know it."""
    for word, flops, bandwidth in DATASHEET:
        if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", device_kind):
            return flops, bandwidth
    return None, None


def _best_rate(fn, work: float, *, calls: int, rounds: int = 5) -> float:
    """work / seconds per call of fn(), the best of `rounds` rounds of `calls` back-to-back calls."""
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        out = [fn() for _ in range(calls)]
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / calls)
        del out
    return work / best


def matmul_ceiling(n: int, device, calls: int = 10) -> float:
    """FLOP/s of a jitted bf16 [n, n] x [n, n] matmul (float32 accumulation, bf16 result) on `device`."""
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16), device)
    mm = jax.jit(jnp.matmul)
    return _best_rate(lambda: mm(a, b), 2.0 * n**3, calls=calls)


def copy_ceiling(nbytes: int, device, calls: int = 10) -> float:
    """Bytes read + written per second by a jitted x + 1 over a float32 buffer of `nbytes` on `device` (an
    elementwise pass: the device-to-device copy rate, which XLA cannot elide as it may a plain copy;
    float32, which every backend adds natively: CPUs convert bf16 and would measure that instead)."""
    x = jax.device_put(jnp.zeros((nbytes // 4,), jnp.float32), device)
    add = jax.jit(lambda x: x + jnp.asarray(1, x.dtype))
    return _best_rate(lambda: add(x), 2.0 * x.nbytes, calls=calls)


def timed(fn, *, warmup: int = 1, repeats: int = 5) -> tuple[float, float]:
    """(first call's seconds, compile included; median seconds of `repeats` calls after `warmup` more).
    fn() must block until its result is ready."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    return first, median_seconds(fn, warmup=warmup, repeats=repeats)


def device_memory(device) -> int | None:
    """Bytes this process may allocate on `device` (None where the backend does not say, e.g. CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001  (backends without memory statistics raise various errors)
        return None
    limit = stats.get("bytes_limit")
    return int(limit) - int(stats.get("bytes_in_use", 0)) if limit else None


def failure(exc: BaseException) -> str:
    """'oom' for an out-of-memory error, else 'error: <its first line>' (for the table and the JSON)."""
    text = f"{type(exc).__name__}: {exc}"
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return "error: " + first[:200]


# -- one layer, ours and PyTorch's ----------------------------------------------------------------------


def jax_layer_step(cfg, impl: str, tokens: int, device):
    """A blocking call: forward + backward of one `DecoderLayer` of `cfg` over [1, tokens, D] (bf16)."""
    lcfg = cfg.replace(num_hidden_layers=1, dtype="bfloat16", param_dtype="bfloat16", attention_impl=impl)
    with jax.default_device(device):
        graphdef, params = nnx.split(DecoderLayer(lcfg, rngs=nnx.Rngs(0)))
        x = jax.random.normal(jax.random.key(1), (1, tokens, cfg.hidden_size), jnp.bfloat16)
        positions = jnp.arange(tokens, dtype=jnp.int32)[None]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, jnp.bfloat16)
        mask = AttentionMask.for_sequence(jnp.ones((1, tokens), jnp.int32))

    def loss(params, x):
        out, _ = nnx.merge(graphdef, params)(x, cos, sin, mask, impl)
        return out.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(grad(params, x))


def torch_layer_step(cfg, tokens: int):
    """(blocking call of forward + backward of transformers' MistralDecoderLayer over [1, tokens, D] in bf16,
    on CUDA if torch sees it, else CPU, for a given forward function (eager or compiled); the eager forward;
    the torch device)."""
    import torch
    from transformers import MistralConfig as HFConfig
    from transformers.models.mistral import modeling_mistral

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = HFConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})
    hf._attn_implementation = "sdpa"
    layer = modeling_mistral.MistralDecoderLayer(hf, layer_idx=0).to(device=device, dtype=torch.bfloat16)
    rope = modeling_mistral.MistralRotaryEmbedding(hf).to(device)
    x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        cos_sin = rope(x, torch.arange(tokens, device=device)[None])

    def forward(x):
        out = layer(x, attention_mask=None, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x returned a tuple

    def call(fwd):
        def run():
            fwd(x).float().sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            layer.zero_grad(set_to_none=True)
            x.grad = None
        return run

    return call, forward, device


def layer_vs_torch(cfg, impl: str, tokens: int, device, *, compile_: bool, repeats: int) -> dict:
    """Ours and PyTorch's layer forward+backward timed alternately -> their medians, first calls and ratio
    (torch / ours: above 1, ours is faster)."""
    import torch

    ours = jax_layer_step(cfg, impl, tokens, device)
    call, forward, torch_device = torch_layer_step(cfg, tokens)
    mode = "eager"
    theirs = call(forward)
    t = time.perf_counter()
    ours()
    ours_first = time.perf_counter() - t
    if compile_ and torch_device == "cuda":  # torch.compile on CPU needs a C compiler and minutes
        try:
            theirs, mode = call(torch.compile(forward)), "torch.compile"
            t = time.perf_counter()
            theirs()
        except Exception as e:  # noqa: BLE001  (compiling fails in many ways; eager is the fallback)
            theirs, mode = call(forward), f"eager (torch.compile failed: {failure(e)[:80]})"
    if mode != "torch.compile":
        t = time.perf_counter()
        theirs()
    theirs_first = time.perf_counter() - t
    ours(), theirs()  # warm-up
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        for fn, times in ((ours, ours_times), (theirs, theirs_times)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    ours_s, theirs_s = statistics.median(ours_times), statistics.median(theirs_times)
    return {"torch": f"torch {torch.__version__} {torch_device} sdpa {mode}", "jax_layer_s": ours_s,
            "torch_layer_s": theirs_s, "jax_first_call_s": ours_first, "torch_first_call_s": theirs_first,
            "ratio": theirs_s / ours_s}
