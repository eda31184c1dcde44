"""The paged KV cache: one pool of fixed-size pages, page tables, and attention over them. The ONE cache
module: the model's forward takes a `Cache` (`MistralForCausalLM.__call__(..., cache=...)`), the engine
and `generate` build pools with the helpers below. Over ~500 lines because the pool's layout, its writes
and both attention paths over it share one set of invariants (below) that must change together.

Inside:
- `KVPages` (the pool: what persists between calls) and `Cache` (the forward's one cache argument: the pool
  plus this call's page tables and ragged layout), both frozen dataclass pytrees.
- Sizing and building: `pages_per_seq`, `page_bytes`, `pool_dtype` (float32 for a 16-bit pool on CPU),
  `abstract_pages`, `init_pages`, `empty_pages` (inside a jit), `pages_shardings`; `KV_DTYPES`.
- `quantize_kv`, `token_rows` (each token's sequence and position), `write_pages` (one layer's new keys and
  values into their pages), `paged_attention` (impl "kernel": the TPU Pallas ragged paged attention kernel;
  impl "xla": plain XLA over key blocks gathered through the page table), `paged_impl` (which of the two).

Layout (the TPU ragged kernel's `kv_pages`):
  kv     [L, P, page, 2K, H]  compute dtype (or int8): key head k at combined head 2k, value head k at 2k+1,
                              so one gather of a page brings a token's keys and values together; or a tuple
                              of L arrays [P, page, 2K, H] (per layer: for unstacked layers, a layer reads
                              its own buffer; XLA CPU would copy a layer's slice out of the stack)
  scale  [L, P, page, 2K]     float32 absmax/127 per (slot, combined head), int8 pools only; else None
A call's tokens form ONE ragged row of T tokens, sequence after sequence: sequence r's tokens are
ids[cu_q_lens[r]:cu_q_lens[r+1]], and they are its LAST q_len tokens, at positions kv_len-q_len .. kv_len-1
(kv_lens counts this call's tokens too). Token t of sequence r at position p lives in page
page_table[r, p // page] at offset p % page. Rows r >= num_seqs are padding, and tokens from
cu_q_lens[num_seqs] on are padding: they write nothing (an out-of-range page, dropped by the scatter) and
attend to nothing (their outputs are 0 on the xla path).

Design choices:
- The pool rides the layer scan's carry in the forward, and each layer scatters its new keys/values into
  it in place (a while-loop carry is updated in place; a second pool would double the memory).
- The xla path, for calls whose longest sequence fits a few hundred slots (most steps of short requests):
  each token gathers its sequence's first 32/64/128/256 slots (the shortest that holds the call's longest
  sequence, a run-time `switch`; each gather kept under GATHER_ELEMENTS) and takes ONE masked softmax: no
  loop (on XLA CPU a loop step, its gathers and batched dots cost more than the wasted slots). Otherwise
  one online softmax in two parts, both by query blocks of 32 tokens: (a) the call's own
  tokens as keys (read back from their slots; each query block visits key blocks back to its sequences'
  first tokens: packed short prompts cost a band, not the [T, T] square), (b) the keys earlier calls
  cached, key blocks of a few pages gathered through the page table once per (query block, sequence in
  it), up to the longest cached length. All trip counts are traced values (fori_loops), so a step's cost
  follows the tokens held, not the page-table width, and one program serves every mix of rows. A query
  block holding many sequences (decode tokens) gathers each one's history, so a step mixing decode rows
  with prefill chunks pays that many gathers for its prefill blocks too (masked).
  Numerics as `xla_attention`: float32 scores and softmax, probabilities cast to the compute dtype.
  An int8 pool enters the matmuls as int8 -> compute dtype; its scales multiply the float32 scores
  (keys) and the probabilities (values), so no dequantized copy of a layer is made.
- The kernel takes a scalar k/v scale only, so int8 pools always take the xla path (`paged_impl`).
- Sharding: ("layers", "cache_pages", "page", "act_kv_heads", "head_dim"); the combined 2K axis is split
  like the KV heads (over `tensor`, only when tensor divides K, so a device holds whole key/value pairs).

Shape letters: L layers, P pages, page slots per page, R sequences (rows of the page table), W pages per
sequence, T tokens of the call, N query heads, K kv heads, G = N // K, H head_dim, S key slots of a block.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding

from jaxmodel.config import MistralConfig
from jaxmodel.sharding import auto_mesh, logical_to_spec, platform  # platform: the mesh's when one is set

KV_DTYPES = (None, "int8")
KV_AXES = ("layers", "cache_pages", "page", "act_kv_heads", "head_dim")
SCALE_AXES = KV_AXES[:-1]
BLOCK_TOKENS = 128  # cached key slots per block of the xla path (whole pages)
OWN_BLOCK = 32  # query/key block of the xla path's attention over the call's own tokens
PER_TOKEN_UPTO = 64  # calls of up to this many tokens gather cached keys per token (see `_xla_attention`)
# A per-token gather's elements at most (`_cached_keys` by token, `_dense_keys`): on XLA CPU a step's time
# jumps by an order of magnitude once one gather outgrows a few MB (bench/engine_steps.py shows it).
GATHER_ELEMENTS = 1 << 21
DENSE_KEYS = (32, 64, 128, 256)  # the key slots per token `_dense_keys` may gather (one branch each)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPages:
    """The pool of pages (see the module docstring for the layout)."""

    kv: jax.Array | tuple  # [L, P, page, 2K, H] or L x [P, page, 2K, H]
    scale: jax.Array | tuple | None = None  # int8 only: float32 [L, P, page, 2K] (or L x [P, page, 2K])

    @property
    def per_layer(self) -> bool:
        return isinstance(self.kv, tuple)

    @property
    def _layer_shape(self) -> tuple:
        return self.kv[0].shape if self.per_layer else self.kv.shape[1:]

    @property
    def num_layers(self) -> int:
        return len(self.kv) if self.per_layer else self.kv.shape[0]

    @property
    def num_pages(self) -> int:
        return self._layer_shape[0]

    @property
    def page_size(self) -> int:
        return self._layer_shape[1]

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def layer(self, i):
        """(kv [P, page, 2K, H], scale [P, page, 2K] or None) of layer i (a Python int or a traced index)."""
        return _layer_of(self.kv, i), _layer_of(self.scale, i)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Cache:
    """Everything attention reads and writes in one call (see the module docstring)."""

    pages: KVPages
    page_table: jax.Array  # [R, W] int32; unused entries 0
    kv_lens: jax.Array  # [R] int32: tokens of sequence r once this call's are written
    cu_q_lens: jax.Array  # [R + 1] int32: this call's tokens of sequence r are [cu[r], cu[r+1])
    num_seqs: jax.Array  # [1] int32: rows >= num_seqs are padding
    logits_at: jax.Array | None = None  # [Q] int32 token indices whose logits the forward returns (None: all)


def _layer_of(x, i):
    if x is None:
        return None
    if isinstance(x, tuple):
        return x[i]
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


# -- sizing and building ---------------------------------------------------------------------------------


def pages_per_seq(max_model_len: int, page_size: int) -> int:
    """W: the page-table width that holds a sequence of max_model_len tokens."""
    return -(-max_model_len // page_size)


class _Leaf(NamedTuple):
    shape: tuple
    dtype: object
    axes: tuple


def _leaves(config: MistralConfig, num_pages: int, page_size: int, dtype, kv_dtype, per_layer: bool):
    """KVPages of `_Leaf`s (shape, dtype, logical axes)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv cache dtype {kv_dtype!r} is not one of {KV_DTYPES}")
    shape = (config.num_hidden_layers, num_pages, page_size, 2 * config.num_key_value_heads, config.head_dim)
    store = jnp.int8 if kv_dtype == "int8" else jnp.dtype(dtype or config.compute_dtype)
    kv = _Leaf(shape, store, KV_AXES)
    scale = _Leaf(shape[:-1], jnp.dtype(jnp.float32), SCALE_AXES) if kv_dtype == "int8" else None
    if per_layer:
        layers = lambda t: None if t is None else tuple(  # noqa: E731
            _Leaf(t.shape[1:], t.dtype, t.axes[1:]) for _ in range(shape[0]))
        kv, scale = layers(kv), layers(scale)
    return KVPages(kv, scale)


def _is_leaf(x) -> bool:
    return isinstance(x, _Leaf)


def pool_dtype(config: MistralConfig, *, dtype=None, kv_dtype=None, mesh=None):
    """The dtype a pool is held in: int8, or the compute dtype (`dtype`, default the config's) except on
    CPU, where a 16-bit float pool is held in float32 (the same values: keys are written rounded to the
    compute dtype and read back cast to it). XLA CPU gathers from and scatters into a bfloat16 array by
    converting ALL of it to float32 and back, every layer of every step (BENCHMARKS.md, "Cold and warm
    start").
    The platform: the mesh's, else the default (`sharding.platform`)."""
    store = jnp.dtype(jnp.int8 if kv_dtype == "int8" else dtype or config.compute_dtype)
    where = platform() if mesh is None else mesh.devices.flat[0].platform
    if where == "cpu" and store.itemsize == 2 and jnp.issubdtype(store, jnp.floating):
        return jnp.dtype(jnp.float32)
    return store


def page_bytes(config: MistralConfig, page_size: int, kv_dtype=None, dtype=None) -> int:
    """Bytes of one page over all layers (values, plus the float32 scales of an int8 pool), held in `dtype`
    (default the config's compute dtype; what a CPU pool takes: `pool_dtype`)."""
    leaves = jax.tree.leaves(_leaves(config, 1, page_size, dtype, kv_dtype, False), is_leaf=_is_leaf)
    return int(sum(np.prod(t.shape) * np.dtype(t.dtype).itemsize for t in leaves))


def _spec(config: MistralConfig, shape: tuple, axes: tuple, mesh):
    # The combined 2K axis is split as the K heads would be: only when the mesh axis divides K, so every
    # device holds whole (key, value) pairs (what the kernel's per-device call needs).
    rule_shape = tuple(config.num_key_value_heads if a == "act_kv_heads" else s for s, a in zip(shape, axes))
    return logical_to_spec(axes, rule_shape, mesh)


def pages_shardings(config: MistralConfig, num_pages: int, page_size: int, mesh, *, dtype=None, kv_dtype=None,
                    per_layer: bool = False) -> KVPages:
    """A KVPages of NamedShardings (from the logical axes and the mesh rules)."""
    mesh = auto_mesh(mesh)
    return jax.tree.map(lambda t: NamedSharding(mesh, _spec(config, t.shape, t.axes, mesh)),
                        _leaves(config, num_pages, page_size, dtype, kv_dtype, per_layer), is_leaf=_is_leaf)


def abstract_pages(config: MistralConfig, num_pages: int, page_size: int, *, dtype=None, kv_dtype=None, mesh=None,
                   per_layer: bool = False) -> KVPages:
    """The pool as ShapeDtypeStructs (with shardings when a mesh is given): no memory. Held in `pool_dtype`."""
    dtype = pool_dtype(config, dtype=dtype, kv_dtype=kv_dtype, mesh=mesh)
    leaves = _leaves(config, num_pages, page_size, dtype, kv_dtype, per_layer)
    if mesh is None:
        return jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype), leaves, is_leaf=_is_leaf)
    shardings = pages_shardings(config, num_pages, page_size, mesh, dtype=dtype, kv_dtype=kv_dtype,
                                per_layer=per_layer)
    return jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), leaves, shardings,
                        is_leaf=_is_leaf)


def init_pages(config: MistralConfig, num_pages: int, page_size: int, *, dtype=None, kv_dtype=None, mesh=None,
               per_layer: bool = False) -> KVPages:
    """A zeroed pool (held in `pool_dtype`), built directly in its sharding when a mesh is given."""
    dtype = pool_dtype(config, dtype=dtype, kv_dtype=kv_dtype, mesh=mesh)
    shapes = abstract_pages(config, num_pages, page_size, dtype=dtype, kv_dtype=kv_dtype, per_layer=per_layer)
    make = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    if mesh is None:
        return jax.jit(make)()
    return jax.jit(make, out_shardings=pages_shardings(config, num_pages, page_size, mesh, dtype=dtype,
                                                       kv_dtype=kv_dtype, per_layer=per_layer))()


def empty_pages(config: MistralConfig, num_pages: int, page_size: int, *, dtype=None, kv_dtype=None,
                per_layer: bool = False) -> KVPages:
    """A zeroed pool built inside a jitted function, each leaf constrained to its logical sharding (under a
    mesh context); inside one jit the compiler also picks the pool's memory layout. Held in `pool_dtype`."""
    leaves = _leaves(config, num_pages, page_size, pool_dtype(config, dtype=dtype, kv_dtype=kv_dtype), kv_dtype,
                     per_layer)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t != AxisType.Auto for t in mesh.axis_types):  # as `sharding.constrain`: no-op
        return jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), leaves, is_leaf=_is_leaf)
    return jax.tree.map(lambda t: jax.lax.with_sharding_constraint(jnp.zeros(t.shape, t.dtype),
                                                                   _spec(config, t.shape, t.axes, mesh)),
                        leaves, is_leaf=_is_leaf)


# -- writing -------------------------------------------------------------------------------------------


def quantize_kv(x):
    """[..., H] -> (int8 [..., H], float32 scale [...]): symmetric absmax over head_dim."""
    absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def token_rows(cache: Cache, length: int):
    """For the call's `length` tokens: (sequence [T], position in it [T], valid [T] bool). Padding tokens
    (from cu_q_lens[num_seqs] on) are invalid, with position 0."""
    t = jnp.arange(length, dtype=jnp.int32)
    rows_total = cache.kv_lens.shape[0]
    live = jnp.arange(rows_total) < cache.num_seqs[0]
    ends = cache.cu_q_lens[1:]
    # A token's sequence = the number of live sequences that end at or before it (empty ones included).
    rows = jnp.sum((ends[None, :] <= t[:, None]) & live[None, :], axis=1, dtype=jnp.int32)
    rows = jnp.minimum(rows, rows_total - 1)
    valid = t < cache.cu_q_lens[cache.num_seqs[0]]
    positions = cache.kv_lens[rows] - (cache.cu_q_lens[rows + 1] - t)
    return rows, jnp.where(valid, positions, 0), valid


def _token_slots(cache: Cache, page_size: int, num_pages: int, length: int):
    """(page [T], offset [T]) of each token's slot; padding tokens get page P (out of range: a write drops)."""
    rows, positions, valid = token_rows(cache, length)
    page = jnp.take_along_axis(cache.page_table[rows], (positions // page_size)[:, None], axis=1)[:, 0]
    return jnp.where(valid, page, num_pages), positions % page_size


def _replace_at(t: tuple, i: int, x) -> tuple:
    return t[:i] + (x,) + t[i + 1:]


def write_pages(pages: KVPages, i, k, v, cache: Cache) -> KVPages:
    """Layer i's new keys and values k, v [T, K, H] into their slots (quantized for an int8 pool); i is
    a Python int for a per-layer pool, else a Python int or a traced index. Only the cache's metadata is
    read (its `pages` may be None: inside the forward the pool travels apart, in the layer scan's carry)."""
    length, kv_heads, head_dim = k.shape
    page, offset = _token_slots(cache, pages.page_size, pages.num_pages, length)
    new = jnp.stack([k, v], axis=2).reshape(length, 2 * kv_heads, head_dim)  # key k at 2k, value k at 2k+1
    scales = None
    if pages.quantized:
        new, scales = quantize_kv(new)
    if pages.per_layer:
        kv = _replace_at(pages.kv, i, pages.kv[i].at[page, offset].set(new.astype(pages.kv[i].dtype), mode="drop"))
        scale = None if scales is None else _replace_at(
            pages.scale, i, pages.scale[i].at[page, offset].set(scales, mode="drop"))
        return KVPages(kv, scale)
    kv = pages.kv.at[i, page, offset].set(new.astype(pages.kv.dtype), mode="drop")
    scale = None if scales is None else pages.scale.at[i, page, offset].set(scales, mode="drop")
    return KVPages(kv, scale)


# -- attention over pages ------------------------------------------------------------------------------


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
    """One online softmax over the keys of each token's sequence: `_dense_keys` (one gather, no loop) at the
    shortest of `_dense_bounds` that holds the call's longest sequence (a run-time `switch`), else (a) the
    call's own keys (`_own_keys`) then (b) the keys cached before the call (`_cached_keys`). The call is
    padded to whole query blocks of OWN_BLOCK tokens."""
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

    # The shortest dense gather that holds the call's longest sequence, else the blocked loops (`switch`).
    full = kv.shape[1] * cache.page_table.shape[1]  # the page table's slots: every sequence fits
    bounds = _dense_bounds(padded, kv, cache)
    branches = [functools.partial(_dense_keys, qg=qg, kv=kv, scale=scale, cache=cache, tokens=tokens, window=window,
                                  bound=bound) for bound in bounds]
    if not bounds or bounds[-1] < full:
        branches.append(blocked)
    if len(branches) == 1:
        carry = branches[0](init)
    else:
        longest = jnp.max(jnp.where(jnp.arange(cache.kv_lens.shape[0]) < cache.num_seqs[0], cache.kv_lens, 0))
        index = sum((longest > bound).astype(jnp.int32) for bound in bounds)
        carry = jax.lax.switch(index, branches, init)
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
    page, offset = _token_slots(cache, kv.shape[1], kv.shape[0], padded)
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
