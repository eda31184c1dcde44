"""The paged KV cache: one pool of fixed-size pages, page tables, and the writes into them. The ONE cache
module: the model's forward takes a `Cache` (`MistralForCausalLM.__call__(..., cache=...)`), the engine
and `generate` build pools with the helpers below; attention over the pages is `jaxmodel.paged_attention`
(it reads the layout and the ragged layout below, which both modules keep).

Inside:
- `KVPages` (the pool: what persists between calls) and `Cache` (the forward's one cache argument: the pool
  plus this call's page tables and ragged layout), both frozen dataclass pytrees.
- Sizing and building: `pages_per_seq`, `page_bytes`, `pool_dtype` (float32 for a 16-bit pool on CPU),
  `abstract_pages`, `init_pages`, `empty_pages` (inside a jit), `pages_shardings`; `KV_DTYPES`.
- `quantize_kv`, `token_rows` (each token's sequence and position), `token_slots` (each token's page and
  offset), `write_pages` (one layer's new keys and values into their pages).

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
- Sharding: ("layers", "cache_pages", "page", "act_kv_heads", "head_dim"); the combined 2K axis is split
  like the KV heads (over `tensor`, only when tensor divides K, so a device holds whole key/value pairs).

Shape letters: L layers, P pages, page slots per page, R sequences (rows of the page table), W pages per
sequence, T tokens of the call, N query heads, K kv heads, G = N // K, H head_dim, S key slots of a block.
"""

from __future__ import annotations

import dataclasses
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


def token_slots(cache: Cache, page_size: int, num_pages: int, length: int, tokens=None):
    """(page [T], offset [T]) of each token's slot; padding tokens get page P (out of range: a write drops).
    tokens: `token_rows(cache, length)` when the caller has it already."""
    rows, positions, valid = token_rows(cache, length) if tokens is None else tokens
    page = jnp.take_along_axis(cache.page_table[rows], (positions // page_size)[:, None], axis=1)[:, 0]
    return jnp.where(valid, page, num_pages), positions % page_size


def _replace_at(t: tuple, i: int, x) -> tuple:
    return t[:i] + (x,) + t[i + 1:]


def write_pages(pages: KVPages, i, k, v, cache: Cache) -> KVPages:
    """Layer i's new keys and values k, v [T, K, H] into their slots (quantized for an int8 pool); i is
    a Python int for a per-layer pool, else a Python int or a traced index. Only the cache's metadata is
    read (its `pages` may be None: inside the forward the pool travels apart, in the layer scan's carry)."""
    length, kv_heads, head_dim = k.shape
    page, offset = token_slots(cache, pages.page_size, pages.num_pages, length)
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
