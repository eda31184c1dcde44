"""Batched generation in one `lax.while_loop` over a paged KV cache, and its two steps.

Inside:
- `generate(model, input_ids, attention_mask, *, max_new_tokens, eos_token_ids, pad_token_id, ...)`:
  greedy (or sampled) generation for a batch of prompts of different lengths -> new tokens [B, W].
- `all_logits(model, ids)`: logits at every position of full rows through the cached forward (quality
  checks of quantized weights: tests, bench/quantize_quality.py).
- `static_pages`, `prefill` / `decode_step`: generate's pool and its two steps as separate jitted
  functions (graphdef static, pool donated), for step-by-step use and tests; all are thin users of the
  model's one forward with a `jaxmodel.kv_cache.Cache`.
- `greedy`, `sample_rows` (token choice, shared with the engine); `bucket_length`, `bucket_batch`: the
  shape buckets that bound recompilation; `GenerateError`: every bad input (empty batch or prompt, ids out
  of range, too long for the context).

How generation runs (one `jax.jit`, one compile per bucket):
1. On the host, each row's real tokens (attention_mask == 1, in order, so left or right padding in the
   input both work) are left-padded to the bucketed prompt length P; rows are padded to the bucketed
   batch with empty rows that start finished.
2. Inside the jit, an empty page pool is made in a static layout: row b owns pages [b*W, (b+1)*W), W
   pages of 16 slots holding P + the bucketed max_new_tokens. Prefill packs the rows' real tokens back to
   back into one ragged row (padding is never computed) and runs it in calls of up to B x `prefill_chunk`
   tokens (a fori_loop over as many as the real tokens need), each row's last token giving its logits.
   Positions are each token's position in its own prompt (the reference's cumsum(mask) - 1).
3. Decoding is a `lax.while_loop` inside the same jit: each iteration feeds every row's last token (one
   ragged row of B tokens, one per sequence) at position = that row's token count, picks the next token
   (argmax, or a seeded sample), writes it to the output unless the row had already stopped (then
   `pad_token_id`), and marks rows whose token is in the stop table. The loop ends when every row has
   stopped or `max_new_tokens` tokens exist; both bounds are traced values, so they cost no
   recompilation. Stop tokens go in as a boolean table over the vocabulary (any number of stop ids).
The pool is created inside that jit and never leaves it: no copy between steps, and the compiler picks its
memory layout. Attention over the pages is `jaxmodel.paged_attention.paged_attention` (the TPU kernel or plain
XLA, as `paged_impl` picks).

Shape letters: B batch, T tokens of one call, P prompt length, W generated tokens (bucketed), V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxmodel.kv_cache import Cache, KVPages, empty_pages, pages_per_seq
from jaxmodel.sharding import auto_mesh, logical_to_spec


class GenerateError(ValueError):
    """A generation request that cannot be served (the message says why, in one line)."""


# -- buckets -------------------------------------------------------------------------------------------

MIN_LENGTH_BUCKET = 16
PREFILL_CHUNK = 512  # prompts longer than this are prefilled in chunks of this many tokens
LINEAR_FROM = 512  # below: powers of two; from here: multiples of this


def bucket_length(n: int) -> int:
    """Powers of two from 16 up to 512, then multiples of 512 (waste < 2x below, < 512 tokens above)."""
    if n <= LINEAR_FROM:
        return max(MIN_LENGTH_BUCKET, 1 << (max(n, 1) - 1).bit_length())
    return -(-n // LINEAR_FROM) * LINEAR_FROM


def bucket_batch(n: int, multiple: int = 1) -> int:
    """The next power of two (and a multiple of the mesh's batch split)."""
    b = 1 << (max(n, 1) - 1).bit_length()
    return -(-b // multiple) * multiple


# -- the cached forward ------------------------------------------------------------------------------


def split_model(model):
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    return model


PAGE_SIZE = 16  # slots per page of generate's pool


def _row_cache(pages: KVPages, rows: int, starts, q_lens, kv_lens, logits_at=None) -> Cache:
    """The Cache of generate's static layout: row b owns pages [b*W, (b+1)*W) of the pool (W = pages / rows);
    this call holds q_lens[b] tokens of row b, packed from starts[b] on (rows in order), kv_lens[b] in all."""
    width = pages.num_pages // rows
    table = jnp.arange(rows * width, dtype=jnp.int32).reshape(rows, width)
    cu = jnp.concatenate([starts[:1] * 0, starts + q_lens]).astype(jnp.int32)
    return Cache(pages, table, kv_lens.astype(jnp.int32), cu, jnp.array([rows], jnp.int32), logits_at)


def static_pages(config, rows: int, length: int, *, kv_dtype=None, per_layer: bool = False) -> KVPages:
    """An empty pool (inside a jit) for `rows` sequences of up to `length` tokens each, in generate's layout."""
    return empty_pages(config, rows * pages_per_seq(length, PAGE_SIZE), PAGE_SIZE, kv_dtype=kv_dtype,
                       per_layer=per_layer)


def all_logits(model, ids):
    """Logits at every position [B, T, V] of full rows `ids` [B, T] through the cached forward (the path
    generation takes, quantized weights included): the rows packed in one ragged call over generate's pool."""
    graphdef, state = nnx.split(model)
    return _all_logits(graphdef, state, jnp.asarray(ids))


@functools.partial(jax.jit, static_argnums=0)
def _all_logits(graphdef, state, ids):
    model = nnx.merge(graphdef, state)
    batch, length = ids.shape
    lens = jnp.full(batch, length, jnp.int32)
    cache = _row_cache(static_pages(model.config, batch, length), batch, jnp.arange(batch, dtype=jnp.int32) * length,
                       lens, lens)
    return model(ids.reshape(1, -1), cache=cache)[0].reshape(batch, length, -1)


def _last_logits(model, ids, mask, pages: KVPages, chunk: int):
    """Prompts [B, P] (real tokens where mask is 1, in order) into an empty pool in generate's layout ->
    (each row's last-token logits [B, V], pool, prompt lengths [B]).

    The rows' real tokens are packed back to back in one ragged row (padding is never computed) and go
    through the model in calls of up to B x `chunk` tokens (the activations of B rows of `chunk`), a
    fori_loop over as many calls as the real tokens need (a traced bound: no recompilation per prompt
    mix); a call may end mid-prompt, the next continues it over the pages already written."""
    batch, prompt = ids.shape
    lens = mask.astype(jnp.int32).sum(-1)
    ends = jnp.cumsum(lens)
    starts = ends - lens
    total = batch * prompt
    size = min(batch * chunk, total)
    calls = -(-total // size)
    # The packed stream: token j is token j - starts[r] of row r's real tokens (its mask's order).
    j = jnp.arange(calls * size, dtype=jnp.int32)
    row = jnp.minimum(jnp.sum(ends[None, :] <= j[:, None], axis=1), batch - 1)
    order = jnp.argsort(1 - mask, axis=1, stable=True)  # each row's real columns first, in order
    column = jnp.take_along_axis(order[row], jnp.clip(j - starts[row], 0, prompt - 1)[:, None], axis=1)[:, 0]
    stream = jnp.where(j < ends[-1], ids[row, column], 0)

    def one_call(c, carry):
        pages, logits = carry
        lo, hi = c * size, (c + 1) * size
        q_lens = jnp.clip(ends, lo, hi) - jnp.clip(starts, lo, hi)
        kv_lens = jnp.maximum(jnp.minimum(ends, hi) - starts, 0)
        last = ends - 1 - lo  # each row's last token, in this call's numbering
        cache = _row_cache(pages, batch, jnp.clip(starts, lo, hi) - lo, q_lens, kv_lens, jnp.clip(last, 0, size - 1))
        out, cache = model(jax.lax.dynamic_slice_in_dim(stream, lo, size)[None], cache=cache)
        here = (last >= 0) & (last < size) & (lens > 0)
        return cache.pages, jnp.where(here[:, None], out[0], logits)

    init = (pages, jnp.zeros((batch, model.config.vocab_size), jnp.float32))
    pages, logits = jax.lax.fori_loop(0, (ends[-1] + size - 1) // size, one_call, init)
    return logits, pages, lens


def _next_logits(model, tokens, pages: KVPages, lengths):
    """One token per row [B] at position lengths[b] (the row's tokens so far) -> (logits [B, V], pool)."""
    batch = tokens.shape[0]
    rows = jnp.arange(batch, dtype=jnp.int32)
    cache = _row_cache(pages, batch, rows, jnp.ones(batch, jnp.int32), lengths + 1)
    logits, cache = model(tokens[None], lengths[None], cache=cache)
    return logits[0], cache.pages


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=4)
def prefill(graphdef, state, ids, mask, pages: KVPages, chunk: int = PREFILL_CHUNK):
    """Prompts [B, P] (mask 1 = real token) into an empty pool in generate's layout (`static_pages`) ->
    (last logits [B, V], pool, prompt lengths [B])."""
    return _last_logits(nnx.merge(graphdef, state), ids, mask, pages, chunk)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def decode_step(graphdef, state, tokens, pages: KVPages, lengths):
    """One token per row [B] after `lengths` tokens -> (logits [B, V], pool, lengths + 1)."""
    logits, pages = _next_logits(nnx.merge(graphdef, state), tokens, pages, lengths)
    return logits, pages, lengths + 1


def prefill_positions(mask):
    """The reference's positions for a left-padded batch: cumsum(mask) - 1, pads clipped to 0."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# -- token choice -------------------------------------------------------------------------------------


def greedy(logits):
    """argmax over the last axis (int32; ties: the lowest index, as torch's argmax), as a max and a min
    of matching indices: two vector reductions where XLA CPU runs argmax's (value, index) reduction
    element by element (measured: 137 -> 70 us for [16, 2048]). A row without a maximum (NaN) picks the
    last id."""
    top = logits.max(axis=-1, keepdims=True)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, ids, logits.shape[-1] - 1), axis=-1)


def _choose(logits, step, rows, do_sample: bool, temperature, top_k, top_p, key):
    """Next token per row from float32 logits [B, V]: argmax, or a sample after temperature, top-k
    and top-p (applied in that order, as transformers' logits warpers do). Each row draws from
    fold_in(fold_in(key, step), row), so a row's sample does not depend on the batch around it."""
    if not do_sample:
        return greedy(logits)
    step_key = jax.random.fold_in(key, step)
    keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)
    return sample_rows(logits, keys, temperature, top_k, top_p)


def sample_rows(logits, keys, temperature, top_k, top_p):
    """One sample per row of float32 logits [B, V] with its own key [B]; temperature, top_k (0 = off)
    and top_p (1 = off) are scalars or per-row vectors [B]."""
    batch, vocab = logits.shape
    column = lambda x: jnp.broadcast_to(jnp.asarray(x).reshape(-1, 1), (batch, 1))  # noqa: E731
    temperature, top_k, top_p = column(temperature), column(top_k), column(top_p)
    logits = logits / jnp.maximum(temperature, 1e-6)
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, k - 1, axis=-1)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = (before < top_p) | (jnp.arange(vocab) == 0)
    threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= jnp.maximum(threshold, kth), logits, -jnp.inf)
    return jax.vmap(lambda kk, lg: jax.random.categorical(kk, lg))(keys, logits).astype(jnp.int32)


# -- the generation loop --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def generate_jit(graphdef, do_sample, width, kv_dtype, chunk, state, ids, mask, active, stop, max_new, pad_id,
                  temperature, top_k, top_p, key):
    """Prefill + the decode while-loop -> tokens [B, W = width]. The pool lives inside this one jit (made
    here, carried by the loop, dropped at the end): it never crosses a jit boundary, so it is neither
    copied nor re-laid out between steps, and the compiler picks its memory layout."""
    batch, prompt = ids.shape
    model = nnx.merge(graphdef, state)
    pages = static_pages(model.config, batch, prompt + width, kv_dtype=kv_dtype,
                         per_layer=model.unstacked)  # unstacked layers: an array per layer
    rows = jnp.arange(batch, dtype=jnp.int32)
    choose = functools.partial(_choose, rows=rows, do_sample=do_sample, temperature=temperature, top_k=top_k,
                               top_p=top_p, key=key)

    logits, pages, lengths = _last_logits(model, ids, mask, pages, chunk)
    token = choose(logits, 0)
    done = ~active
    out = jnp.full((batch, width), pad_id, jnp.int32)
    out = out.at[:, 0].set(jnp.where(done, pad_id, token))
    done = done | stop[token]

    def cond(carry):
        t, _, done, _, _ = carry
        return (t < max_new) & ~jnp.all(done)

    def body(carry):
        t, token, done, out, pages = carry
        logits, pages = _next_logits(model, token, pages, lengths + t - 1)
        token = choose(logits, t)
        column = jnp.where(done, pad_id, token)[:, None]
        out = jax.lax.dynamic_update_slice(out, column, (0, t))
        return t + 1, token, done | stop[token], out, pages

    _, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, done, out, pages))
    return out


def mesh_of(state):
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return auto_mesh(sharding.mesh)
    return None


def _batch_split(mesh) -> int:
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def _prepare(config, input_ids, attention_mask, max_new_tokens, eos_token_ids):
    """Host-side checks; returns the rows' real-token lists."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise GenerateError(f"input_ids must be [batch, length], got shape {ids.shape}")
    if ids.shape[0] == 0:
        raise GenerateError("empty batch: no prompts to generate from")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise GenerateError(f"input_ids must be integers, got {ids.dtype}")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise GenerateError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise GenerateError("attention_mask must hold only 0 (padding) and 1 (token)")
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    rows = [ids[b][mask[b] == 1] for b in range(ids.shape[0])]
    context, vocab = config.max_position_embeddings, config.vocab_size
    for b, row in enumerate(rows):
        if row.size == 0:
            raise GenerateError(f"prompt {b} is empty (no tokens with attention_mask 1)")
        bad = row[(row < 0) | (row >= vocab)]
        if bad.size:
            raise GenerateError(f"prompt {b}: token id {int(bad[0])} is out of range [0, {vocab})")
        if row.size + max_new_tokens > context:
            raise GenerateError(f"prompt {b} has {row.size} tokens; with max_new_tokens={max_new_tokens} that "
                                f"exceeds the model's context of {context} tokens")
    for e in eos_token_ids:
        if not 0 <= int(e) < vocab:
            raise GenerateError(f"stop token id {int(e)} is out of range [0, {vocab})")
    return rows


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, eos_token_ids: Sequence[int] = (),
             pad_token_id: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, kv_cache_dtype: str | None = None,
             prefill_chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """New tokens [B, max_new_tokens] (int32) for a batch of prompts, as transformers' `generate` returns
    them after the prompt: greedy by default; a row that emits one of `eos_token_ids` keeps that token
    and is `pad_token_id` afterwards (default: the config's pad id, else the first stop id, else 0).

    model: an `nnx.Module` or its (graphdef, state); placed on a mesh, generation runs on that mesh.
    do_sample: sample with `temperature`, `top_k` (0 = off) and `top_p` (1 = off), seeded by `seed`.
    kv_cache_dtype: None (the compute dtype) or "int8". prefill_chunk: prompts longer than this are
    prefilled chunk by chunk (bounded activation memory)."""
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise GenerateError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
    graphdef, state = split_model(model)
    config = nnx.merge(graphdef, state).config
    eos = [int(e) for e in eos_token_ids]
    rows = _prepare(config, input_ids, attention_mask, max_new_tokens, eos)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)

    mesh = mesh_of(state)
    batch = bucket_batch(len(rows), _batch_split(mesh))
    prompt = bucket_length(max(r.size for r in rows))
    width = bucket_length(max_new_tokens)
    ids = np.zeros((batch, prompt), np.int32)
    mask = np.zeros((batch, prompt), np.int32)
    for b, row in enumerate(rows):  # left padding: the last real token sits at slot prompt - 1
        ids[b, prompt - row.size:] = row
        mask[b, prompt - row.size:] = 1
    active = np.arange(batch) < len(rows)
    stop = np.zeros(config.vocab_size, bool)
    stop[eos] = True

    args = (ids, mask)
    if mesh is not None:
        spec = logical_to_spec(("batch", "length"), ids.shape, mesh)
        # From the host copy every process holds (the same prompts everywhere): each device gets its rows;
        # this also works when the mesh spans several processes, where device_put of host data may not.
        args = tuple(jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i, a=a: a[i])
                     for a in args)
    sampling = (np.float32(temperature), np.int32(top_k), np.float32(top_p), jax.random.key(seed))
    call = functools.partial(generate_jit, graphdef, bool(do_sample), width, kv_cache_dtype, prefill_chunk, state,
                             *args, active, stop,
                             np.int32(max_new_tokens), np.int32(pad_token_id), *sampling)
    if mesh is None:
        out = call()
    else:
        with jax.set_mesh(mesh):
            out = call()
    if not out.is_fully_addressable:  # a mesh over several processes: every process gets all rows
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out)[: len(rows), :max_new_tokens]
