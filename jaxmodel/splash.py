"""Splash attention: the Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) behind our
`AttentionMask` and [B, T, N, H] layout.

Inside: `splash_attention(q, k, v, mask, *, scale, block_sizes=None, interpret=False)`.

How our mask maps onto the kernel's:
- The kernel takes a *static* positional mask (built in numpy at trace time, from which it derives which
  blocks to skip) and-ed with per-token `SegmentIds`. causal -> `CausalMask`; causal=False ->
  `FullMask` (bidirectional within each document, the segment ids do the rest); a sliding window ->
  `LocalMask` with a left window of `window - 1` (Mistral's q - kv < window) and a right one of 0 when
  causal, unbounded when not.
- Static masks speak of array positions, so this path assumes `q_indices` / `kv_indices` are 0..T-1 and
  0..S-1 (what `AttentionMask.for_sequence` builds for training and prefill). Masks over cache slots
  (decode) belong to the other implementations.
- Grouped-query attention is native: the MHA kernel takes k/v as [K, S, H] and q as [N, T, H] with
  N a multiple of K, so KV heads are never repeated. Batch is a `vmap` over the per-example kernel.
- The kernel does not scale scores: q is multiplied by `scale` (in float32, then cast back) first.
- Lengths that are not block multiples are padded; padded tokens get segment id -1 (so real tokens
  never see them; real ids must not be -1) and, sitting after every real token, see each other, so
  no softmax row is empty.

The function uses only per-device shapes and no collectives, so a later `shard_map` over batch and
heads can wrap it unchanged. `interpret=True` runs the kernel's Pallas interpreter (any backend, slow):
that is how the tests run it on CPU.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads, H head_dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from jaxmodel.masks import AttentionMask

_PAD_SEGMENT = -1
_LANES = 128  # the kernel's key blocks must be multiples of the TPU lane width


def default_block_sizes(length: int, kv_length: int) -> splash_kernel.BlockSizes:
    """512-wide blocks (or the whole, 128-rounded, sequence if shorter).

    The fused backward kernel (dq, dk, dv in one pass) keeps a float32 partial dq per key block, a buffer
    that grows with the number of key blocks: in the 11B 32K training step it costs 17 GiB per v5p chip
    (53 vs 36 GiB, measured with compile-check). It is used only up to 8 key blocks (4K tokens); longer
    sequences take the separate dq and dkv kernels."""
    bq = min(512, _round_up(length, _LANES))
    bkv = min(512, _round_up(kv_length, _LANES))
    fused = _round_up(kv_length, bkv) // bkv <= 8
    return splash_kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                    block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                    block_q_dq=None if fused else bq, block_kv_dq=None if fused else bkv,
                                    use_fused_bwd_kernel=fused)


def splash_attention(q, k, v, mask: AttentionMask, *, scale: float,
                     block_sizes: splash_kernel.BlockSizes | None = None, interpret: bool = False):
    """q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H] in q's dtype, via the splash kernel."""
    batch, length, heads, head_dim = q.shape
    kv_length, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if block_sizes is None:
        block_sizes = default_block_sizes(length, kv_length)
    t_pad = _round_up(length, _lcm(block_sizes.block_q, block_sizes.block_q_dkv, block_sizes.block_q_dq))
    s_pad = _round_up(kv_length, _lcm(block_sizes.block_kv, block_sizes.block_kv_dkv, block_sizes.block_kv_dq))

    kernel = splash_kernel.make_splash_mha(
        _static_mask(mask, heads, t_pad, s_pad), block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
        interpret=interpret)
    # Scale in float32 so a bfloat16 q is rounded once, after scaling, not twice.
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qs = _pad(qs.transpose(0, 2, 1, 3), 2, t_pad)  # [B,N,Tp,H]
    kt = _pad(k.transpose(0, 2, 1, 3), 2, s_pad)  # [B,K,Sp,H]
    vt = _pad(v.transpose(0, 2, 1, 3), 2, s_pad)
    segments = splash_kernel.SegmentIds(q=_pad_ids(mask.q_segment_ids, t_pad),
                                        kv=_pad_ids(mask.kv_segment_ids, s_pad))
    out = jax.vmap(kernel)(qs, kt, vt, segments)  # [B,N,Tp,H]
    return out[:, :, :length].transpose(0, 2, 1, 3).astype(q.dtype)


def _static_mask(mask: AttentionMask, heads: int, length: int, kv_length: int) -> splash_mask.MultiHeadMask:
    shape = (length, kv_length)
    if mask.window is not None:
        # LocalMask keeps kv >= q - left (and kv <= q + right): left = window - 1 is q - kv < window.
        head_mask = splash_mask.LocalMask(shape, (mask.window - 1, 0 if mask.causal else None), offset=0)
    elif mask.causal:
        head_mask = splash_mask.CausalMask(shape)
    else:
        head_mask = splash_mask.FullMask(shape)
    return splash_mask.MultiHeadMask([head_mask] * heads)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _lcm(*blocks) -> int:
    return math.lcm(*(b for b in blocks if b is not None))


def _pad(x, axis, size):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _pad_ids(ids, size):
    return jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, size - ids.shape[1])), constant_values=_PAD_SEGMENT)
