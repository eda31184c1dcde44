"""Attention over the paged KV cache (`jaxmodel.kv_cache`: the pool's layout and a call's ragged layout are
described there): `paged_attention(q, kv, scale, cache, impl=...)` with impl "kernel" (the TPU Pallas
ragged paged attention kernel shipped with JAX) or "xla" (plain XLA over keys gathered through the page
table), and `paged_impl` (the ONE place that picks between them).

Design choices:
- The xla path, for calls whose sequences fit a few hundred slots (most steps of short requests), runs no
  loop, by parts: the call's first R tokens (an engine step puts every decode token there) and the rest (its
  prompt chunks), each with a run-time `switch`: a part whose sequences have nothing cached from earlier
  calls (fresh prompts) takes one masked softmax over the call's own tokens read back from their slots
  (`_call_keys`); otherwise each of its tokens gathers its sequence's first 32/64/128/256 slots (the
  shortest that holds the part's longest sequence; each gather kept under GATHER_ELEMENTS) and takes ONE
  masked softmax (`_dense_keys`). So prompts packed behind long decoding rows pay for their own few keys,
  not the decode rows' (on XLA CPU a loop step, its gathers and batched dots cost more than wasted slots).
  Otherwise one online softmax over the whole call in two parts, both by query blocks of 32 tokens: (a) the
  call's own tokens as keys (read back from their slots; each query block visits key blocks back to its
  sequences' first tokens: packed short prompts cost a band, not the [T, T] square), (b) the keys earlier
  calls cached, key blocks of a few pages gathered through the page table once per (query block, sequence in
  it), up to the longest cached length. All trip counts are traced values (fori_loops), so a step's cost
  follows the tokens held, not the page-table width, and one program serves every mix of rows. A query block
  holding many sequences (decode tokens) gathers each one's history, so a step mixing decode rows with
  prefill chunks pays that many gathers for its prefill blocks too (masked).
  Numerics as `xla_attention`: float32 scores and softmax, probabilities cast to the compute dtype. An int8
  pool enters the matmuls as int8 -> compute dtype; its scales multiply the float32 scores (keys) and the
  probabilities (values), so no dequantized copy of a layer is made.
- The kernel takes a scalar k/v scale only, so int8 pools always take the xla path (`paged_impl`); under a
  mesh it runs per device (`shard_map`), heads split over `tensor` when that divides the query and KV heads.

Shape letters: L layers, P pages, page slots per page, R sequences (rows of the page table), W pages per
sequence, T tokens of the call, N query heads, K kv heads, G = N // K, H head_dim, S key slots of a block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmodel.config import MistralConfig
from jaxmodel.kv_cache import Cache, KVPages, token_rows, token_slots
from jaxmodel.sharding import platform  # platform: the mesh's when one is set

BLOCK_TOKENS = 128  # cached key slots per block of the xla path (whole pages)
OWN_BLOCK = 32  # query/key block of the xla path's attention over the call's own tokens
PER_TOKEN_UPTO = 64  # calls of up to this many tokens gather cached keys per token (see `_xla_attention`)
# A per-token gather's elements at most (`_cached_keys` by token, `_dense_keys`): on XLA CPU a step's time
# jumps by an order of magnitude once one gather outgrows a few MB (bench/engine_steps.py shows it).
GATHER_ELEMENTS = 1 << 21
DENSE_KEYS = (32, 64, 128, 256)  # the key slots per token `_dense_keys` may gather (one branch each)
SQUARE_SCORES = 1 << 23  # `_call_keys` runs for a part of Q tokens in a call of T when Q * T * heads fits this




def paged_impl(config: MistralConfig, pages: KVPages) -> str:
    """The ONE place that picks the paged attention: the Pallas kernel on a TPU backend for a non-int8 pool
    whose head_dim fills the TPU's 128 lanes; else plain XLA (CPU, GPU, int8 pools, small heads)."""
    if platform() == "tpu" and not pages.quantized and config.head_dim % 128 == 0:
        return "kernel"
    return "xla"


def paged_attention(q, kv, scale, cache: Cache, *, impl: str = "xla", window: int | None = None):
    """q [T, N, H] (the call's tokens, RoPE applied) over one layer's pages kv [P, page, 2K, H] (int8 with
    scale [P, page, 2K], or the compute dtype) -> [T, N, H] in q's dtype. Token t sees the keys of its own
    sequence at positions <= its own (and within the sliding `window`)."""
    if impl == "kernel":
        if scale is not None:
            raise ValueError("the ragged paged attention kernel takes no int8 pool (use impl='xla')")
        return _kernel_attention(q, kv, cache, window)
    if impl != "xla":
        raise ValueError(f"paged attention impl={impl!r} is not one of kernel, xla")
    return _xla_attention(q, kv, scale, cache, window)


def _kernel_attention(q, kv, cache: Cache, window):
    """The TPU ragged paged attention kernel (its interpreter off TPU), per device under a mesh."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention  # Pallas: this path only

    length, heads, head_dim = q.shape
    options = dict(sm_scale=head_dim**-0.5, sliding_window=window)
    if jax.devices()[0].platform != "tpu":
        # The kernel looks its tuned block sizes up by the default device's TPU version; from a CPU host
        # (an ahead-of-time compile for a TPU topology, or the interpreter) pass its untuned defaults.
        options.update(num_kv_pages_per_block=min(cache.page_table.shape[1], 128),
                       num_queries_per_block=min(length, 32))

    def local(q, kv, kv_lens, table, cu, num_seqs):
        return ragged_paged_attention(q, kv, kv_lens, table, cu, num_seqs, **options)

    args = (q, kv, cache.kv_lens, cache.page_table, cache.cu_q_lens, cache.num_seqs)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(*args)
    from jax.sharding import PartitionSpec as P

    # Pallas is not partitioned by XLA: heads split over `tensor` when it divides both the query and the
    # KV heads (each device keeps whole GQA groups and whole key/value pairs), else replicated.
    kv_heads = kv.shape[2] // 2
    tensor = mesh.shape.get("tensor", 1)
    axis = "tensor" if tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0 else None
    q_spec, kv_spec = P(None, axis, None), P(None, None, axis, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, P(), P(), P(), P()), out_specs=q_spec,
                         check_vma=False)(*args)


def _xla_attention(q, kv, scale, cache: Cache, window):
    """One online softmax over the keys of each token's sequence: by parts of the call, `_call_keys` or
    `_dense_keys` (no loop; see the module docstring), else (a) the call's own keys (`_own_keys`) then (b)
    the keys cached before the call (`_cached_keys`). The call is padded to whole query blocks of OWN_BLOCK
    tokens."""
    length, heads, head_dim = q.shape
    kv_heads = kv.shape[2] // 2
    dt = q.dtype
    block = min(OWN_BLOCK, length)
    padded = -(-length // block) * block  # whole query blocks for (a); the extra tokens are padding
    q = jnp.pad(q, ((0, padded - length), (0, 0), (0, 0)))
    tokens = token_rows(cache, padded)
    qg = q.reshape(padded, kv_heads, heads // kv_heads, head_dim)
    shape = (padded, kv_heads, heads // kv_heads)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))

    def blocked(carry):
        carry = _own_keys(carry, qg, kv, scale, cache, tokens, window, block)
        # Small calls (decode steps: a token per sequence), and any call whose per-token gather of one key
        # block stays under GATHER_ELEMENTS (short contexts), gather per token, one loop step per key
        # block; larger ones by query blocks, so a long prefill chunk gathers its sequence's pages once per
        # block (a block mixing decode tokens of many sequences then takes a loop step per sequence).
        small = padded <= PER_TOKEN_UPTO or padded * _span(kv, cache) * kv.shape[2] * head_dim <= GATHER_ELEMENTS
        return _cached_keys(carry, qg, kv, scale, cache, tokens, window, 1 if small else block)

    # The dense path by parts: the first R tokens (R = page-table rows: every decode token of an engine step,
    # whose plan puts decoding sequences first) and the rest (its prompt chunks). Per part, a run-time
    # `switch`: when none of its tokens' sequences has keys from earlier calls (fresh prompts), one masked
    # softmax over the call's own tokens (`_call_keys`: no per-token gather); else the shortest dense gather
    # that holds the longest sequence among ITS tokens, so prompts packed behind long decoding rows gather
    # their own few slots, not the decode rows'. Otherwise (a sequence longer than a part's bounds) the
    # blocked loops over the whole call.
    rows_total = cache.kv_lens.shape[0]
    parts = [(0, padded)] if padded <= rows_total else [(0, rows_total), (rows_total, padded)]
    part_bounds = [_dense_bounds(hi - lo, kv, cache) for lo, hi in parts]
    squares = [(hi - lo) * padded * heads <= SQUARE_SCORES for lo, hi in parts]
    full = kv.shape[1] * cache.page_table.shape[1]  # the page table's slots: every sequence fits
    rows, _, valid = tokens
    cached = cache.kv_lens - (cache.cu_q_lens[1:] - cache.cu_q_lens[:-1])  # [R] keys from earlier calls

    def most(x, lo, hi):  # the largest x[row] among the valid tokens lo .. hi-1
        return jnp.max(jnp.where(valid[lo:hi], x[rows[lo:hi]], 0))

    def index_of(lo, hi, bounds, square):  # the part's branch; len(branches) when none fits
        index = sum((most(cache.kv_lens, lo, hi) > bound).astype(jnp.int32) for bound in bounds) + square
        return jnp.where(square & (most(cached, lo, hi) == 0), 0, index) if square else index

    def dense(carry):
        out = []
        for (lo, hi), bounds, square in zip(parts, part_bounds, squares):
            part = jax.tree.map(lambda x, lo=lo, hi=hi: x[lo:hi], (carry, tokens))
            kw = dict(qg=qg[lo:hi], kv=kv, scale=scale, cache=cache, tokens=part[1], window=window)
            branches = ([functools.partial(_call_keys, **kw, keys_of=tokens)] if square else []) + [
                functools.partial(_dense_keys, **kw, bound=bound) for bound in bounds]
            index = jnp.minimum(index_of(lo, hi, bounds, square), len(branches) - 1)
            out.append(branches[0](part[0]) if len(branches) == 1 else jax.lax.switch(index, branches, part[0]))
        return jax.tree.map(lambda *x: jnp.concatenate(x), *out)

    if not all(b or sq for b, sq in zip(part_bounds, squares)):  # a part has no dense branch at all
        carry = blocked(init)
    elif all(b and b[-1] >= full for b in part_bounds):  # every sequence fits every part's largest bound
        carry = dense(init)
    else:
        fits = functools.reduce(jnp.logical_and, [
            index_of(lo, hi, b, sq) < len(b) + sq for (lo, hi), b, sq in zip(parts, part_bounds, squares)])
        carry = jax.lax.cond(fits, dense, blocked, init)
    _, denom, acc = carry
    out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]
    return out.reshape(padded, heads, head_dim)[:length].astype(dt)


def _span(kv, cache: Cache) -> int:
    """Key slots per block of `_cached_keys` (whole pages)."""
    page_size, width = kv.shape[1], cache.page_table.shape[1]
    return max(1, min(width, BLOCK_TOKENS // page_size)) * page_size


def _dense_bounds(length: int, kv, cache: Cache) -> list[int]:
    """The key slots per token `_dense_keys` may gather for a call of `length` tokens, ascending: DENSE_KEYS
    rounded up to whole pages, capped at the page table's slots, each gather at most GATHER_ELEMENTS."""
    page_size, width = kv.shape[1], cache.page_table.shape[1]
    per_slot = length * kv.shape[2] * kv.shape[3]
    bounds = {min(-(-slots // page_size), width) * page_size for slots in DENSE_KEYS}
    return sorted(b for b in bounds if b * per_slot <= GATHER_ELEMENTS)


def _dense_keys(carry, *, qg, kv, scale, cache: Cache, tokens, window, bound: int):
    """Every token over the first `bound` slots of its own sequence, gathered through the page table in one
    step (the call's own keys included: they are written before attention, and read back from their
    slots as `_own_keys` reads them): one gather and one masked softmax, no loop. Valid when no sequence
    of the call is longer than `bound`."""
    padded, kv_heads, group, head_dim = qg.shape
    rows, positions, valid = tokens
    pages = cache.page_table[rows][:, :bound // kv.shape[1]]  # [T, bound / page]
    keys = kv[pages].reshape(padded, bound, kv_heads, 2, head_dim)
    key_scale = None if scale is None else scale[pages].reshape(padded, bound, kv_heads, 2)
    slots = jnp.arange(bound, dtype=jnp.int32)
    allowed = valid[:, None] & (slots[None, :] <= positions[:, None])  # [T, S]
    if window is not None:
        allowed &= positions[:, None] - slots[None, :] < window
    return _attend(carry, qg[:, None], keys, key_scale, allowed[:, None])


def _call_keys(carry, *, qg, kv, scale, cache: Cache, tokens, window, keys_of):
    """Tokens whose sequences have no keys from earlier calls (fresh prompts) over the call's own tokens
    `keys_of` (every token of the call: a prompt may start in an earlier part), read back from their slots
    as `_own_keys` reads them: one gather of the call's slots and one masked [part, call] softmax, no loop."""
    rows, positions, valid = tokens
    key_rows, key_positions, key_valid = keys_of
    length, (kv_heads, head_dim) = key_rows.shape[0], qg.shape[1::2]
    page, offset = token_slots(cache, kv.shape[1], kv.shape[0], length, keys_of)
    keys = kv.at[page, offset].get(mode="clip").reshape(1, length, kv_heads, 2, head_dim)
    key_scale = None if scale is None else scale.at[page, offset].get(mode="clip").reshape(1, length, kv_heads, 2)
    distance = positions[:, None] - key_positions[None, :]
    allowed = valid[:, None] & key_valid[None, :] & (rows[:, None] == key_rows[None, :]) & (distance >= 0)
    if window is not None:
        allowed &= distance < window
    return _attend(carry, qg[None], keys, key_scale, allowed[None])


def _cached_keys(carry, qg, kv, scale, cache: Cache, tokens, window, block: int):
    """The online softmax's second part: the keys earlier calls wrote, in key blocks of whole pages up to
    the longest cached length. By query blocks of `block` tokens: step (j, i) gives every query block the
    j-th key block of the i-th sequence among its tokens, gathered through the page table once for the
    block's tokens; the steps run to the most sequences one query block holds (a prefill chunk: 1-2; a
    block of decode tokens: one per token, each its own history), all bounds traced values. Under a cond,
    skipped when nothing is cached (a fresh prefill): XLA CPU peels a loop's first gather out of it."""
    padded, kv_heads, group, head_dim = qg.shape
    rows, positions, valid = tokens
    num = padded // block
    page_size = kv.shape[1]
    q_lens = cache.cu_q_lens[1:] - cache.cu_q_lens[:-1]
    live = jnp.arange(cache.kv_lens.shape[0]) < cache.num_seqs[0]
    cached = jnp.where(live, cache.kv_lens - q_lens, 0)  # [R] tokens written by earlier calls
    width = cache.page_table.shape[1]
    span = _span(kv, cache)
    per_block = span // page_size
    blocks_total = -(-width // per_block)
    table = jnp.pad(cache.page_table, ((0, 0), (0, blocks_total * per_block - width)))
    by_block = lambda x: x.reshape(num, block)  # noqa: E731
    q_rows, q_pos, q_valid = by_block(rows), by_block(positions), by_block(valid)
    first = jnp.min(jnp.where(q_valid, q_rows, rows.shape[0]), axis=1)  # [J] first sequence of each block
    last = jnp.max(jnp.where(q_valid, q_rows, -1), axis=1)
    per_query_block = jnp.max(last - first + 1)  # sequences in the fullest query block
    key_blocks = jnp.clip((jnp.max(cached) + span - 1) // span, 0, blocks_total)
    qb = qg.reshape(num, block, kv_heads, group, head_dim)
    total_rows = cache.kv_lens.shape[0]

    def visit(n, carry):
        j, i = n // per_query_block, n % per_query_block
        seq = jnp.clip(first + i, 0, total_rows - 1)  # [J]
        pages = jax.lax.dynamic_slice_in_dim(table[seq], j * per_block, per_block, axis=1)  # [J, bp]
        keys = kv[pages].reshape(num, span, kv_heads, 2, head_dim)
        key_scale = None if scale is None else scale[pages].reshape(num, span, kv_heads, 2)
        slots = j * span + jnp.arange(span, dtype=jnp.int32)
        allowed = ((q_rows == (first + i)[:, None]) & q_valid)[:, :, None] & (slots < cached[seq][:, None])[:, None]
        if window is not None:
            allowed &= q_pos[:, :, None] - slots[None, None, :] < window
        return _attend(carry, qb, keys, key_scale, allowed)

    steps = key_blocks * per_query_block
    return jax.lax.cond(steps > 0, lambda c: jax.lax.fori_loop(0, steps, visit, c), lambda c: c, carry)


def _own_keys(carry, qg, kv, scale, cache: Cache, tokens, window, block: int):
    """The online softmax's first part: the call's own tokens as keys, read back from their slots (so an
    int8 pool gives the values it holds, as a later call would see them). By query blocks of `block`
    tokens: step j pairs every query block b with key block b - j, for as many steps as the longest
    sequence of the call spans blocks (a traced trip count), so packed short prompts cost a band of
    blocks instead of the [T, T] square, and a decode step one block; one block (block = T): one step, no
    loop. Letters: J blocks, C = block."""
    padded, kv_heads, group, head_dim = qg.shape
    rows, positions, valid = tokens
    num = padded // block
    page, offset = token_slots(cache, kv.shape[1], kv.shape[0], padded, tokens)
    own = kv.at[page, offset].get(mode="clip").reshape(num, block, kv_heads, 2, head_dim)
    own_scale = None if scale is None else scale.at[page, offset].get(mode="clip").reshape(num, block, kv_heads, 2)
    qb = qg.reshape(num, block, kv_heads, group, head_dim)
    by_block = lambda x: x.reshape(num, block)  # noqa: E731
    q_rows, q_pos, q_valid = by_block(rows), by_block(positions), by_block(valid)

    def visit(j, carry):
        kb = jnp.arange(num) - j  # each query block's key block
        at = jnp.maximum(kb, 0)
        distance = q_pos[:, :, None] - q_pos[at][:, None, :]  # [J, C, S]
        allowed = ((kb >= 0)[:, None, None] & (q_rows[:, :, None] == q_rows[at][:, None, :]) & (distance >= 0)
                   & q_valid[:, :, None] & q_valid[at][:, None, :])
        if window is not None:
            allowed &= distance < window
        return _attend(carry, qb, own[at], None if own_scale is None else own_scale[at], allowed)

    if num == 1:
        return visit(0, carry)
    # Blocks back to the first token of the token's sequence in this call (cu_q_lens[row]).
    t = jnp.arange(padded, dtype=jnp.int32)
    back = jnp.where(valid, t // block - cache.cu_q_lens[rows] // block, 0)
    steps = jnp.minimum(jnp.max(back) + 1, num)
    return jax.lax.fori_loop(0, steps, visit, carry)


def _attend(carry, qb, keys, key_scale, allowed):
    """One online-softmax step of query blocks qb [J, C, K, G, H] (compute dtype) over their key blocks
    keys [J, S, K, 2, H] (key head k at [..., k, 0, :], its values at [..., k, 1, :]; int8 with key_scale
    [J, S, K, 2], or the compute dtype and None), allowed [J, C, S] -> the updated carry. An int8 block
    enters the matmuls as int8 -> compute dtype: its key scales multiply the float32 scores and its value
    scales the probabilities, so no dequantized copy is made."""
    num, block, kv_heads, group, head_dim = qb.shape
    span, dt = keys.shape[1], qb.dtype
    s = jnp.einsum("JCKGH,JSKH->JCKGS", qb, keys[:, :, :, 0].astype(dt), preferred_element_type=jnp.float32)
    v_scale = 1.0
    if key_scale is not None:
        key_scale = key_scale.transpose(0, 2, 3, 1)  # [J, K, 2, S]
        s, v_scale = s * key_scale[:, None, :, None, 0], key_scale[:, None, :, None, 1]

    def product(p):
        p = (p.reshape(num, block, kv_heads, group, span) * v_scale).astype(dt)
        pv = jnp.einsum("JCKGS,JSKH->JCKGH", p, keys[:, :, :, 1].astype(dt), preferred_element_type=jnp.float32)
        return pv.reshape(num * block, kv_heads, group, head_dim)

    s = s.reshape(num * block, kv_heads, group, span) * head_dim**-0.5
    return _online(carry, s, allowed.reshape(num * block, span), product)


def _online(carry, s, allowed, product):
    """One online-softmax step: float32 scores s [T, K, G, S] (masked by allowed [T, S]); product(p) is
    the probabilities' float32 product with the values [T, K, G, H] (p and the values enter it in the
    compute dtype, as `xla_attention` casts them) -> the updated (running max, denominator, accumulator)."""
    m, denom, acc = carry
    s = jnp.where(allowed[:, None, None], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing allowed yet: exp(-inf) = 0
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    return m_new, alpha * denom + p.sum(-1), alpha[..., None] * acc + product(p)
