"""The KV cache type and the attention of new tokens over it: what the model's one forward needs to run
with a cache (`MistralForCausalLM.__call__(..., cache=...)`). Building, sharding and sizing caches is
inference's business (inference/kv_cache.py); this module only reads and writes one.

Inside: `KVCache` (a NamedTuple pytree), `quantize_kv`, `write_kv` (one layer's new keys/values into the
cache, at one shared slot or at a slot per row, optionally into chosen cache rows), `write_segments`,
`take_rows`, `layer_of` / `layer_shape`, `cache_mask`, `cached_attention` (the whole cache,
masked), `blocked_cached_attention` (blocks up to the last slot written, online softmax), `kv_block`.

Layout (one array per K and V for the whole model, stacked like the parameters):
  k, v             [L, B, K, S, H]  compute dtype (or int8); or tuples of L arrays [B, K, S, H] ("per
                                    layer", the layout for unstacked layers: `layer_of` needs no copy)
  k_scale, v_scale [L, B, K, S]     float32 absmax/127 per (kv head, slot), only for int8; else None
  segment_ids      [B, S] int32     1 for a real token in that slot, 0 for padding and unfilled slots
  lengths          [B] int32        real tokens cached per row = the RoPE position of its next token
`write_index` addresses the slots a call writes: a scalar (every row writes slots i..i+T-1: the static
batch, whose prompts are left-padded to one length), a vector [B] (row b writes slots i_b..i_b+T-1: the
engine's ragged slots, each row at its own length), or [B, T] with `cache_rows` [B, T] (token (b, t) goes
to slot write_index[b, t] of cache row cache_rows[b, t]: several prompts packed in one row). Per-row
writes are scatters that drop slots past the end (a finished row can be addressed at S and writes
nothing). `cache_rows` [B] lets B new rows address B' >= B cache rows (the engine's prefill of a few
slots): row b reads and writes cache row cache_rows[b], and only one layer's rows are gathered at a time
for attention (no copy of the cache).

Attention of T new queries over a cache: query t of row b sits at slot write_index_b + t and may see
slot s iff s is filled with the same segment id (1) and s <= that slot (and within the sliding window):
`jaxmodel.attention.AttentionMask` with kv indices = slot numbers. Numerics as `xla_attention`: float32
scores and softmax, probabilities cast to the value dtype. An int8 cache enters the matmuls as int8 ->
compute dtype; its scales multiply the float32 scores (keys) and the probabilities (values), per slot,
so no dequantized copy of a layer is made.

Shape letters: L layers, B batch, T new tokens, K kv heads, G = N // K, S cache slots, H head_dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxmodel.attention import AttentionMask


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    k_scale: jax.Array | None  # [L, B, K, S] float32 (int8 cache only)
    v_scale: jax.Array | None
    segment_ids: jax.Array  # [B, S] int32
    lengths: jax.Array  # [B] int32

    @property
    def batch_size(self) -> int:
        return layer_shape(self.k)[0]

    @property
    def max_length(self) -> int:
        return layer_shape(self.k)[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


def layer_shape(cache_k) -> tuple:
    """One layer's [B, K, S, H] of a stacked cache array [L, B, K, S, H] or a per-layer tuple."""
    return cache_k[0].shape if isinstance(cache_k, tuple) else cache_k.shape[1:]


def layer_of(cache_k, i):
    """Layer i of a stacked cache array (a slice) or of a per-layer tuple (its own array: no copy)."""
    if cache_k is None:
        return None
    if isinstance(cache_k, tuple):
        return cache_k[i]
    return jax.lax.dynamic_index_in_dim(cache_k, i, 0, keepdims=False)


def quantize_kv(x):
    """[..., H] -> (int8 [..., H], float32 scale [...]): symmetric absmax over head_dim."""
    absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def _slots(write_index, length: int):
    """[B, T] slot numbers written by a per-row write index [B] (or given per token: [B, T])."""
    if jnp.ndim(write_index) == 2:
        return write_index
    return write_index[:, None] + jnp.arange(length, dtype=jnp.int32)


def _rows(rows, batch: int, length: int):
    """[B, T] cache row numbers: row b of the new tokens goes to cache row rows[b] (default b), or token
    (b, t) to rows[b, t] (packed prompts)."""
    rows = jnp.arange(batch, dtype=jnp.int32) if rows is None else rows
    if rows.ndim == 2:
        return rows
    return jnp.broadcast_to(rows[:, None], (batch, length))


def write_kv(cache_k, scale, new, i, write_index, rows=None):
    """Writes new [B, T, K, H] into layer i of cache_k [L, B', K, S, H] or of a per-layer tuple of
    [B', K, S, H] arrays (quantizing for an int8 cache,
    whose scales [L, B', K, S] come along) at slots write_index.. (scalar or [B]; or [B, T] per token);
    with `rows` [B] or [B, T] (a vector write_index only), row b (token (b, t)) goes to cache row rows[b]
    (rows[b, t]); a row past the end writes nothing. Returns (k, scale)."""
    if isinstance(cache_k, tuple):  # per layer: write layer i's own array (i is a Python int)
        k, sc = write_kv(cache_k[i][None], None if scale is None else scale[i][None], new, 0, write_index, rows)
        replace = lambda t, x: t[:i] + (x[0],) + t[i + 1:]  # noqa: E731
        return replace(cache_k, k), (None if scale is None else replace(scale, sc))
    store = None
    if scale is None:
        values = new.astype(cache_k.dtype)
    else:
        values, store = quantize_kv(new)
    if jnp.ndim(write_index) == 0:
        if rows is not None:
            raise ValueError("cache rows need a per-row write_index")
        start = (i, 0, 0, write_index, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, values.transpose(0, 2, 1, 3)[None], start)
        if scale is not None:
            scale = jax.lax.dynamic_update_slice(scale, store.transpose(0, 2, 1)[None], start[:-1])
        return cache_k, scale
    batch, length = new.shape[:2]
    rows = _rows(rows, batch, length)
    slots = _slots(write_index, length)
    # Advanced indices around a slice: the indexed shape is [B, T, K, H], the layout `new` already has.
    cache_k = cache_k.at[i, rows, :, slots, :].set(values, mode="drop")
    if scale is not None:
        scale = scale.at[i, rows, :, slots].set(store, mode="drop")
    return cache_k, scale


def write_segments(segment_ids, token_mask, write_index, rows=None):
    """The cache's segment ids [B', S] with the new tokens' mask [B, T] written at their slots (of cache
    rows `rows` [B] when given)."""
    if jnp.ndim(write_index) == 0 and rows is None:
        return jax.lax.dynamic_update_slice(segment_ids, token_mask, (0, write_index))
    batch, length = token_mask.shape
    return segment_ids.at[_rows(rows, batch, length), _slots(write_index, length)].set(token_mask, mode="drop")


def take_rows(x, rows):
    """x [B', ...] -> [B, ...]: the cache rows `rows` (None: all); a row past the end reads the last."""
    return x if rows is None or x is None else jnp.take(x, rows, axis=0, mode="clip")


def cache_mask(token_mask, segment_ids, write_index, window) -> AttentionMask:
    """The mask of new queries [B, T] (at slots write_index..) over the whole cache (already written)."""
    batch, length = token_mask.shape
    slots = segment_ids.shape[1]
    offset = write_index[:, None] if jnp.ndim(write_index) else write_index
    q_idx = jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))
    kv_idx = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, slots))
    return AttentionMask(token_mask, segment_ids, q_idx, kv_idx, True, window)


def kv_block(slots: int, largest: int = 512) -> int:
    """The largest power of two <= `largest` that divides the cache length."""
    block = largest
    while slots % block and block > 1:
        block //= 2
    return block


def cached_attention(q, k, v, mask: AttentionMask, k_scale=None, v_scale=None):
    """q [B,T,N,H] over one layer's cache k/v [B,K,S,H] (int8 with scales [B,K,S], or the compute dtype)."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    dt = q.dtype
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", qg, k.astype(dt), preferred_element_type=jnp.float32)
    scores = scores * head_dim**-0.5
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :]
    scores = jnp.where(mask.dense()[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, None, :]
    # [B,K,G,T,H] first, then the head transpose: XLA CPU runs "BKGTS,BKSH->BTKGH" as a strided batch dot
    # at about a third of the speed (a decode step's attention: 316 -> 140 us on 16 rows); same sums.
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs.astype(dt), v.astype(dt)).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, head_dim)


def blocked_cached_attention(q, k, v, mask: AttentionMask, write_index, k_scale=None, v_scale=None, *,
                             block: int = 512):
    """`cached_attention` over key blocks of `block` slots with an online softmax, visiting only the
    blocks up to the last slot written (max over rows of write_index + T - 1): a cache read bounded by
    the filled length, [B, K, G, T, block] float32 scores at a time. S must be a multiple of `block`."""
    batch, length, heads, head_dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    dt = q.dtype
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    shape = (batch, kv_heads, heads // kv_heads, length)

    def visit(j, carry):
        m, denom, acc = carry
        kv_part = lambda x: jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=2)  # noqa: E731
        ids = lambda x: jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=1)  # noqa: E731
        part = mask._replace(kv_segment_ids=ids(mask.kv_segment_ids), kv_indices=ids(mask.kv_indices))
        s = jnp.einsum("BTKGH,BKSH->BKGTS", qg, kv_part(k).astype(dt), preferred_element_type=jnp.float32)
        s = s * head_dim**-0.5
        if k_scale is not None:
            s = s * kv_part(k_scale)[:, :, None, None, :]
        s = jnp.where(part.dense()[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing allowed yet: exp(-inf) = 0
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        denom = alpha * denom + p.sum(-1)
        if v_scale is not None:
            p = p * kv_part(v_scale)[:, :, None, None, :]
        pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(dt), kv_part(v).astype(dt),
                        preferred_element_type=jnp.float32)
        return m_new, denom, alpha[..., None] * acc + pv

    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    last = jnp.max(write_index) if jnp.ndim(write_index) else write_index
    blocks = jnp.clip((last + length + block - 1) // block, 0, slots // block)
    _, denom, acc = jax.lax.fori_loop(0, blocks, visit, init)
    out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]  # [B,K,G,T,H]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(dt)
