"""Attention: the implementations chosen by `MistralConfig.attention_impl`, and the dispatcher over them.

Inside:
- `AttentionMask` (defined in masks.py, re-exported here): which key a query may see, as per-token vectors.
- `xla_attention`: the plain reference (one einsum for scores, float32 softmax, one einsum for the
  output), grouped-query without repeating KV heads; with a causal sliding window short against the
  sequence, by query blocks over their band of keys (`_banded`: the same sums, no scores for keys the
  window excludes).
- `resolve_impl` / `dot_product_attention`: the dispatcher on `impl`: `xla` (above), `flash` (the
  blockwise pure-JAX kernel in flash_attention.py, any backend), `splash` (the Pallas TPU kernel in
  splash.py; its interpreter off TPU), `cudnn` (`jax.nn.dot_product_attention`'s cuDNN kernel, NVIDIA
  GPUs only) and `auto`: splash on TPU, cuDNN on GPU for 16-bit inputs (flash for float32, which cuDNN
  does not take), and on CPU xla up to 1024 tokens (the [T, S] matrix is small) and flash above.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query heads
per kv head, H head_dim.

Mask semantics: see masks.py (one definition shared by every implementation).

Imports go one way: this dispatcher sits on top of the kernels (flash_attention.py, splash.py), which
import only masks.py; `platform` (re-exported here) lives in sharding.py, at the bottom.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxmodel.flash_attention import flash_attention
from jaxmodel.masks import AttentionMask
from jaxmodel.sharding import logical_to_spec, platform

BAND_BLOCK = 32  # query block of the banded path (xla_attention with a causal sliding window)


def xla_attention(q, k, v, mask: AttentionMask, *, scale: float):
    """Reference attention. q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H] in q's dtype.

    Scores and softmax are float32 (as the PyTorch reference's softmax(dtype=float32)); the
    probabilities are cast to v's dtype before the value product, as the reference does.
    A causal sliding window over a sequence (T == S, indices = positions, as `for_sequence` builds) that
    is short against T takes the banded path (`_banded`): the same scores for the allowed keys, none
    computed for keys no query of a block can see."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if _bands(mask, length, k.shape[1]):
        return _banded(q, k, v, mask, scale)
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    allowed = mask.dense()[:, None, None, :, :]
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # [B,K,G,T,H] first, then the head transpose: XLA CPU runs "BKGTS,BSKH->BTKGH" as a strided batch dot
    # at a fraction of the speed (as in kv_cache.cached_attention); the same sums.
    out = jnp.einsum("BKGTS,BSKH->BKGTH", probs, v).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, head_dim)


def _band_span(window: int) -> int:
    """Keys before a query block's first position that its queries may see: window - 1, in whole blocks."""
    return -(-(window - 1) // BAND_BLOCK) * BAND_BLOCK


def bands(window: int, length: int) -> bool:
    """Whether a causal sliding window of `window` over `length` tokens takes `xla_attention`'s banded
    path: whole query blocks, each with a band of keys (span + block) shorter than the sequence."""
    return length % BAND_BLOCK == 0 and _band_span(window) + BAND_BLOCK < length


def _bands(mask: AttentionMask, length: int, kv_length: int) -> bool:
    return mask.window is not None and mask.causal and length == kv_length and bands(mask.window, length)


def _banded(q, k, v, mask: AttentionMask, scale: float):
    """`xla_attention` for a causal sliding window, by query blocks: block j (queries j*C .. j*C+C-1)
    scores only the keys at positions j*C - span .. j*C+C-1 (span = window - 1 rounded up to blocks),
    which hold every key the window allows it; the mask is applied to them exactly as `dense` would.
    [B, J, K, G, C, span + C] scores instead of [B, K, G, T, T]: for packed short prompts (the engine's
    prefill) a band of keys instead of the whole row. Letters: J query blocks, C = BAND_BLOCK, W band."""
    batch, length, heads, head_dim = q.shape
    kv_heads, block = k.shape[2], BAND_BLOCK
    span, blocks = _band_span(mask.window), length // block
    keys = np.arange(blocks)[:, None] * block + np.arange(span + block)[None] - span  # [J, W] positions (static)
    valid = jnp.asarray(keys >= 0)
    keys = np.maximum(keys, 0)
    kb, vb = k[:, keys], v[:, keys]  # [B, J, W, K, H]
    q_seg, kv_seg, q_idx, kv_idx = (jnp.asarray(x) for x in mask[:4])  # the fields may be numpy arrays
    band = AttentionMask(q_seg.reshape(batch, blocks, block), kv_seg[:, keys], q_idx.reshape(batch, blocks, block),
                         kv_idx[:, keys], mask.causal, mask.window)
    allowed = band.dense() & valid[None, :, None, :]  # [B, J, C, W]
    qb = q.reshape(batch, blocks, block, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("BJCKGH,BJWKH->BJKGCW", qb, kb, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed[:, :, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BJKGCW,BJWKH->BJKGCH", probs, vb).transpose(0, 1, 4, 2, 3, 5)
    return out.reshape(batch, length, heads, head_dim)


def resolve_impl(impl: str, *, length: int, dtype=None) -> str:
    """Picks the implementation for `auto` (and checks explicit choices are available here).

    `length` is the query length; `dtype` the inputs' dtype (on GPU, `auto` picks cuDNN only for 16-bit
    inputs, which is all its flash kernel accepts)."""
    target = platform()
    if impl == "auto":
        if target == "tpu":
            return "splash"
        if target == "gpu":
            half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            return "cudnn" if half else "flash"
        # CPU: xla's [T, S] float32 scores are small up to 1K tokens; beyond, they grow as T^2.
        return "xla" if length <= 1024 else "flash"
    if impl not in ("xla", "flash", "splash", "cudnn"):
        raise ValueError(f"attention_impl={impl!r} is not one of auto, xla, flash, cudnn, splash")
    if impl == "cudnn" and target != "gpu":
        raise NotImplementedError(
            f"attention_impl='cudnn' runs only on NVIDIA GPUs (this is {target!r}); use 'flash' or 'auto'")
    return impl


def _per_device(kernel, q, k, v, mask: AttentionMask):
    """Runs a per-device kernel (Pallas cannot be partitioned by XLA) under `shard_map` when a mesh is set.

    Batch is split like the activations (`batch` rule); heads are split over `tensor` only when both the
    query and the KV heads divide, so each device keeps whole GQA groups. Otherwise (tensor > KV heads)
    attention runs head-replicated over `tensor`: correct, with the redundancy confined to this op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, mask)
    batch_axes = logical_to_spec(("batch",), q.shape[:1], mesh)[0]
    q_heads = logical_to_spec(("act_heads",), q.shape[2:3], mesh)[0]
    kv_heads = logical_to_spec(("act_kv_heads",), k.shape[2:3], mesh)[0]
    if q_heads != kv_heads:
        q_heads = kv_heads = None
    q_spec, kv_spec, ids = P(batch_axes, None, q_heads, None), P(batch_axes, None, kv_heads, None), P(batch_axes)

    def local(q, k, v, q_seg, kv_seg, q_idx, kv_idx):
        return kernel(q, k, v, AttentionMask(q_seg, kv_seg, q_idx, kv_idx, mask.causal, mask.window))

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids, ids, ids, ids),
                         out_specs=q_spec, check_vma=False)(q, k, v, *mask[:4])


def dot_product_attention(q, k, v, mask: AttentionMask, *, impl: str = "auto"):
    """q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H] with the implementation `impl` (see the module docstring)."""
    scale = q.shape[-1] ** -0.5
    impl = resolve_impl(impl, length=q.shape[1], dtype=q.dtype)
    if impl == "flash":
        return flash_attention(q, k, v, mask, scale=scale)
    if impl == "splash":
        from jaxmodel.splash import splash_attention  # lazy: Pallas TPU ops load only on this path

        kernel = partial(splash_attention, scale=scale, interpret=platform() != "tpu")
        return _per_device(kernel, q, k, v, mask)
    if impl == "cudnn":
        # jax.nn has no segment-id input, so the exact mask goes in as a dense [B, 1, T, S] boolean (cuDNN
        # turns it into a bias). `is_causal` is added for self-attention (T == S, where our indices are
        # positions) only so that cuDNN skips the upper triangle; it removes nothing the mask allows.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None], scale=scale,
                                           is_causal=mask.causal and q.shape[1] == k.shape[1],
                                           implementation="cudnn")
        return out.astype(q.dtype)
    return xla_attention(q, k, v, mask, scale=scale)
