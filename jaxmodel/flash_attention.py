"""Blockwise (flash) attention in pure JAX: O(T) memory forward and backward, any backend.

Inside: `flash_attention(q, k, v, mask, *, scale, block_q, block_k)`, same layout, mask semantics and
numerics contract as `attention.xla_attention` (float32 scores, softmax statistics and accumulators;
probabilities cast to v's dtype before the value product).

How it works (FlashAttention-2's algorithm, written with lax loops instead of a kernel):
- Forward: a scan over query blocks; for each, a loop over key blocks keeps the running row max `m`,
  the running denominator and an unnormalized output accumulator (online softmax), so only one
  [block_q, block_k] score tile per (batch, head) exists at a time. It returns the output and the
  row logsumexp `lse = m + log(denominator)`, nothing else.
- Backward (`jax.custom_vjp`): a scan over key blocks; for each, a loop over query blocks recomputes the
  score tile from q, k and the saved `lse` (p = exp(s - lse) is already normalized), and accumulates
  dk, dv for that key block locally and dq into one float32 buffer shaped like q. The [T, S] matrix is
  never stored; residuals are q, k, v, the output and lse.
- Block skipping: the mask is per-token vectors, so each block gets a cheap summary (min/max index,
  min/max segment id). A (query block, key block) pair is visited only if the summaries say some pair
  may be allowed (causal: the key block starts at or before the query block's last index; window: the
  key block ends inside the window of the query block's first index; segments: the id ranges overlap).
  Each loop runs only from the first to the last visited block (the causal upper triangle and the
  keys behind a sliding window cost nothing) and a `lax.cond` skips blocks in between that are
  disjoint (other packed documents). The test is conservative; the exact mask is applied inside.
  The summaries are reduced over the batch, so one loop serves all B rows (under `vmap` a cond would
  become a select that computes both sides).
- Grouped-query attention: q is viewed as [B, K, G, T, H] and k/v as [B, K, S, H]; the G query heads
  of a KV head share its tile in one matmul, KV heads are never repeated.
- Lengths that are not block multiples are padded internally (blocks shrink to the 8-rounded length
  when the sequence is shorter, e.g. 8 for a decode step). Padded tokens get segment id -1, so real
  queries never see them (real ids must not be -1), and they are left out of the block summaries, so
  blocks of padding are never visited. A padded query row may thus see no key: the online softmax
  keeps such rows finite (output 0, lse -inf, zero gradient) and they are sliced off.

Block sizes: 512 x 512 by default (a [B, K, G, 512, 512] float32 tile: 4 MiB per batch row and KV
head at G = 4); smaller blocks skip more of the causal triangle but run more, smaller loop steps.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head_dim.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmodel.masks import AttentionMask

_PAD_SEGMENT = -1
_PAD_INDEX = jnp.iinfo(jnp.int32).max


def flash_attention(q, k, v, mask: AttentionMask, *, scale: float, block_q: int = 512, block_k: int = 512):
    """q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H] in q's dtype, without a [T, S] intermediate."""
    batch, length, heads, head_dim = q.shape
    kv_length, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    # Blocks never larger than the (8-rounded) sequence: a 300-token call needs no 512-wide tile.
    block_q = min(block_q, _round_up(length, 8))
    block_k = min(block_k, _round_up(kv_length, 8))
    t_pad, s_pad = _round_up(length, block_q), _round_up(kv_length, block_k)

    # [B,T,N,H] -> [B,K,G,T,H]: the G heads sharing a KV head become rows of one matmul per tile.
    qg = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,K,S,H]
    qg = _pad_axis(qg, 3, t_pad)
    kg, vg = _pad_axis(kg, 2, s_pad), _pad_axis(vg, 2, s_pad)
    vecs = (_pad_vec(mask.q_segment_ids, t_pad, _PAD_SEGMENT), _pad_vec(mask.kv_segment_ids, s_pad, _PAD_SEGMENT),
            _pad_vec(mask.q_indices, t_pad, _PAD_INDEX), _pad_vec(mask.kv_indices, s_pad, _PAD_INDEX))
    static = _Static(float(scale), block_q, block_k, bool(mask.causal), mask.window, length, kv_length)
    out = _flash(static, qg, kg, vg, *vecs)  # [B,K,G,Tp,H]
    out = out[:, :, :, :length].transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)
    return out.astype(q.dtype)


class _Static(NamedTuple):
    """The hashable non-array arguments of the custom-VJP function."""

    scale: float
    block_q: int
    block_k: int
    causal: bool
    window: int | None
    length: int  # real (unpadded) query length
    kv_length: int  # real key length


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_axis(x, axis, size):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _pad_vec(x, size, value):
    x = x.astype(jnp.int32)
    return jnp.pad(x, ((0, 0), (0, size - x.shape[1])), constant_values=value)


# -- the mask, per tile and per block ------------------------------------------------------------------


def _tile_mask(static, q_seg, kv_seg, q_idx, kv_idx):
    """[B, bq, bk] allowed pairs of one tile, exactly as `AttentionMask.dense` defines them."""
    allowed = q_seg[:, :, None] == kv_seg[:, None, :]
    distance = q_idx[:, :, None] - kv_idx[:, None, :]
    if static.causal:
        allowed &= distance >= 0
    if static.window is not None:
        allowed &= distance < static.window
    return allowed


def _block_summary(vec, real_length, block):
    """Per-block min and max of a [B, padded] vector over its real tokens: [B, n_blocks] each.

    Padding is left out (min INT32_MAX, max INT32_MIN), so a block of padding matches nothing and a
    partly padded one is summarized by its real tokens alone (a decode step's one query is not widened
    to INT32_MAX and still stops at its own cache slot)."""
    real = (jnp.arange(vec.shape[1]) < real_length)[None]
    info = jnp.iinfo(jnp.int32)
    lo = jnp.where(real, vec, info.max).reshape(vec.shape[0], -1, block).min(-1)
    hi = jnp.where(real, vec, info.min).reshape(vec.shape[0], -1, block).max(-1)
    return lo, hi


def _visit(static, q_seg, kv_seg, q_idx, kv_idx):
    """[nq, nk] bool: tiles that may hold an allowed pair for some batch row (conservative)."""
    qs_lo, qs_hi = _block_summary(q_seg, static.length, static.block_q)
    ks_lo, ks_hi = _block_summary(kv_seg, static.kv_length, static.block_k)
    qi_lo, qi_hi = _block_summary(q_idx, static.length, static.block_q)
    ki_lo, ki_hi = _block_summary(kv_idx, static.kv_length, static.block_k)
    col = lambda x: x[:, :, None]  # noqa: E731  (query blocks along axis 1, key blocks along axis 2)
    row = lambda x: x[:, None, :]  # noqa: E731
    visit = (col(qs_lo) <= row(ks_hi)) & (row(ks_lo) <= col(qs_hi))
    if static.causal:
        visit &= row(ki_lo) <= col(qi_hi)
    if static.window is not None:
        # Some pair with q - kv < window exists iff kv_max + window > q_min (written so that neither
        # the INT32_MIN/MAX of empty summaries nor real indices overflow).
        visit &= row(ki_hi) + static.window > col(qi_lo)
    return visit.any(axis=0)


def _bounds(visit):
    """First and one-past-last True along the last axis (0, 0 where a row has none)."""
    n = visit.shape[-1]
    any_ = visit.any(-1)
    first = jnp.argmax(visit, axis=-1)
    last = n - jnp.argmax(visit[..., ::-1], axis=-1)
    return jnp.where(any_, first, 0).astype(jnp.int32), jnp.where(any_, last, 0).astype(jnp.int32)


def _scores(static, q_blk, k_blk, allowed):
    """Masked float32 scores [B,K,G,bq,bk]; disallowed pairs are -inf."""
    s = jnp.einsum("BKGTH,BKSH->BKGTS", q_blk, k_blk, preferred_element_type=jnp.float32) * static.scale
    return jnp.where(allowed[:, None, None], s, -jnp.inf)


def _slice(x, axis, start, size):
    return lax.dynamic_slice_in_dim(x, start, size, axis)


# -- forward -----------------------------------------------------------------------------------------


def _forward(static, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    """Output [B,K,G,Tp,H] (float32) and lse [B,K,G,Tp] (float32, -inf for rows with no key)."""
    bq, bk = static.block_q, static.block_k
    visit = _visit(static, q_seg, kv_seg, q_idx, kv_idx)
    lo, hi = _bounds(visit)
    acc_shape = q.shape[:3] + (bq,)

    def q_block(_, i):
        q_blk = _slice(q, 3, i * bq, bq)
        qs, qi = _slice(q_seg, 1, i * bq, bq), _slice(q_idx, 1, i * bq, bq)

        def tile(j, carry):
            m, denom, acc = carry
            k_blk, v_blk = _slice(k, 2, j * bk, bk), _slice(v, 2, j * bk, bk)
            allowed = _tile_mask(static, qs, _slice(kv_seg, 1, j * bk, bk), qi, _slice(kv_idx, 1, j * bk, bk))
            s = _scores(static, q_blk, k_blk, allowed)
            m_new = jnp.maximum(m, s.max(-1))
            # Rows with no allowed key so far keep m = -inf; subtract 0 there so exp gives 0, not NaN.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            denom = alpha * denom + p.sum(-1)
            pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
            return m_new, denom, alpha[..., None] * acc + pv

        def maybe_tile(j, carry):
            return lax.cond(visit[i, j], tile, lambda _, c: c, j, carry)

        init = (jnp.full(acc_shape, -jnp.inf, jnp.float32), jnp.zeros(acc_shape, jnp.float32),
                jnp.zeros(acc_shape + (q.shape[-1],), jnp.float32))
        m, denom, acc = lax.fori_loop(lo[i], hi[i], maybe_tile, init)
        empty = denom == 0  # a row with no allowed key (only possible for padding): output 0, lse -inf
        denom = jnp.where(empty, 1.0, denom)
        return None, (acc / denom[..., None], jnp.where(empty, -jnp.inf, m + jnp.log(denom)))

    _, (out, lse) = lax.scan(q_block, None, jnp.arange(q.shape[3] // bq))
    # [nq, B,K,G,bq,(H)] -> [B,K,G,Tp,(H)]
    out = jnp.moveaxis(out, 0, 3).reshape(q.shape[:3] + (-1, q.shape[-1]))
    lse = jnp.moveaxis(lse, 0, 3).reshape(q.shape[:3] + (-1,))
    return out, lse


# -- backward ----------------------------------------------------------------------------------------


def _backward(static, q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse, dout):
    bq, bk = static.block_q, static.block_k
    visit = _visit(static, q_seg, kv_seg, q_idx, kv_idx).T  # [nk, nq]: key blocks outer
    lo, hi = _bounds(visit)
    # delta_t = sum_h dO * O = sum_s p * dp (the softmax Jacobian's row term), float32.
    delta = jnp.einsum("BKGTH,BKGTH->BKGT", dout.astype(jnp.float32), out.astype(jnp.float32))
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows with no key: p = exp(-inf) = 0, not NaN

    def kv_block(dq, j):
        k_blk, v_blk = _slice(k, 2, j * bk, bk), _slice(v, 2, j * bk, bk)
        ks, ki = _slice(kv_seg, 1, j * bk, bk), _slice(kv_idx, 1, j * bk, bk)

        def tile(i, carry):
            dq, dk, dv = carry
            q_blk, do_blk = _slice(q, 3, i * bq, bq), _slice(dout, 3, i * bq, bq)
            allowed = _tile_mask(static, _slice(q_seg, 1, i * bq, bq), ks, _slice(q_idx, 1, i * bq, bq), ki)
            s = _scores(static, q_blk, k_blk, allowed)
            p = jnp.exp(s - _slice(lse_safe, 3, i * bq, bq)[..., None])  # normalized probabilities
            dv = dv + jnp.einsum("BKGTS,BKGTH->BKSH", p.astype(dout.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - _slice(delta, 3, i * bq, bq)[..., None]) * static.scale
            dk = dk + jnp.einsum("BKGTS,BKGTH->BKSH", ds, q_blk.astype(jnp.float32))
            dq_blk = _slice(dq, 3, i * bq, bq) + jnp.einsum("BKGTS,BKSH->BKGTH", ds, k_blk.astype(jnp.float32))
            return lax.dynamic_update_slice_in_dim(dq, dq_blk, i * bq, 3), dk, dv

        def maybe_tile(i, carry):
            # The cond wraps the whole tile, dq included: XLA aliases the untouched buffer through
            # the skip branch, so a skipped block costs no copy of dq.
            return lax.cond(visit[j, i], tile, lambda _, c: c, i, carry)

        zeros = jnp.zeros(k_blk.shape, jnp.float32)
        dq, dk, dv = lax.fori_loop(lo[j], hi[j], maybe_tile, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(kv_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(k.shape[2] // bk))
    dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)  # [nk, B,K,bk,H] -> [B,K,Sp,H]
    dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    return _forward(static, q, k, v, q_seg, kv_seg, q_idx, kv_idx)[0].astype(q.dtype)


def _flash_fwd(static, q, k, v, q_seg, kv_seg, q_idx, kv_idx):
    out, lse = _forward(static, q, k, v, q_seg, kv_seg, q_idx, kv_idx)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse)


def _flash_bwd(static, residuals, dout):
    q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse = residuals
    dq, dk, dv = _backward(static, q, k, v, q_seg, kv_seg, q_idx, kv_idx, out, lse, dout)
    return dq, dk, dv, None, None, None, None  # integer mask vectors have no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)
