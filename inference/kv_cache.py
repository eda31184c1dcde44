"""The KV cache: an explicit pytree passed into each step and returned (donated), never module state.
(`inference.generate` builds it inside its one jitted program, where the decode loop carries it.)

Inside: `cache_shardings`, `init_cache`, `abstract_cache`, `empty_cache`; re-exported from
`jaxmodel.kv_cache` (where the model's one forward reads and writes it): `KVCache`, `quantize_kv`.

Layout (one array per K and V for the whole model, stacked like the parameters):
  k, v          [L, B, K, S, H]  compute dtype (or int8 with `kv_dtype="int8"`)
  k_scale, v_scale [L, B, K, S]  float32 absmax/127 per (kv head, slot), only for int8; else None
  segment_ids   [B, S] int32     1 for a real token in that slot, 0 for left padding and unfilled slots
  lengths       [B] int32        real tokens cached per row = the RoPE position of that row's next token
Slots are shared by the rows of a batch: prompts are left-padded to one length P, so slot P + t holds
decode step t of every row. That is why one scalar `write_index` (kept by the caller) addresses a write,
and why per-row state reduces to the segment ids (what may be attended) and the lengths (positions).

Design choices:
- [L, ...] first, like the stacked parameters: the layer scan carries the whole cache and updates layer
  i in place with `lax.dynamic_update_slice` (a while-loop carry is updated in place; a scan's stacked
  outputs would be a second buffer the size of the cache).
- Per layer (`per_layer=True`, for a model whose layers are unstacked, `jaxmodel.model.unstack_layers`):
  k, v (and their scales) are tuples of L arrays [B, K, S, H], so that layer i reads its own buffer.
  XLA CPU copies a layer's slice out of the stacked cache before attending over it (as it copies
  stacked weights); a layer's own array needs no copy. The engine and `generate` pick this form
  whenever the model's layers are a list.
- [K, S, H] as the minor dims (heads before slots): what the cache attention contracts directly
  ('BTKGH,BKSH->BKGTS'), so a layer's slice needs no transpose, and (S, H) tiles without padding.
- Memory layout on TPU: the compiler keeps a loop-carried cache in its own tiled layout (slot-major for
  decode steps). A cache that crosses a jit boundary in the default row-major layout is therefore copied
  whole around every step (the compile check showed +1 cache of temporaries). Hence `generate` makes
  the cache inside its single program, and the AOT decode-step check compiles the step with
  `Layout.AUTO` for the cache, the layout a serving loop would keep it in.
- Sharding by the mesh rules: `cache_batch` over data(+fsdp), `act_kv_heads` over tensor (replicated
  when tensor does not divide the KV heads, as the K/V projections are), `cache_length` whole.
- int8 cache: symmetric absmax per (KV head, slot) over head_dim. It halves the cache (what lets the 11B
  model with int8 weights and 8 x 4K tokens fit a 16 GiB v5e chip). The decode attention reads the int8
  values straight into its matmuls and applies the scales to the scores (keys) and to the
  probabilities (values), so no dequantized copy of a layer's cache is made.

Shape letters: L layers, B batch, K kv heads, S cache length, H head_dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jaxmodel.config import MistralConfig
from jaxmodel.kv_cache import KVCache, quantize_kv  # noqa: F401  (the type and int8 rule live with the model)
from jaxmodel.sharding import auto_mesh, constrain, logical_to_spec

KV_AXES = ("layers", "cache_batch", "act_kv_heads", "cache_length", "head_dim")
SCALE_AXES = KV_AXES[:-1]
SEGMENT_AXES = ("cache_batch", "cache_length")
LENGTH_AXES = ("cache_batch",)
KV_DTYPES = (None, "int8")


class _Leaf(NamedTuple):
    shape: tuple
    dtype: object
    axes: tuple


def _shapes(config: MistralConfig, batch: int, length: int, dtype, kv_dtype, per_layer: bool = False) -> KVCache:
    """The cache's leaves as `_Leaf`s (shape, dtype, logical axes); per_layer: K and V (and their
    scales) as tuples of one array per layer (for a model whose layers are unstacked)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv cache dtype {kv_dtype!r} is not one of {KV_DTYPES}")
    kv = (config.num_hidden_layers, batch, config.num_key_value_heads, length, config.head_dim)
    store = jnp.int8 if kv_dtype == "int8" else jnp.dtype(dtype)
    values = _Leaf(kv, store, KV_AXES)
    scale = _Leaf(kv[:-1], jnp.float32, SCALE_AXES) if kv_dtype == "int8" else None
    if per_layer:
        layers = lambda x: None if x is None else tuple(  # noqa: E731
            _Leaf(x.shape[1:], x.dtype, x.axes[1:]) for _ in range(kv[0]))
        values, scale = layers(values), layers(scale)
    return KVCache(values, values, scale, scale, _Leaf((batch, length), jnp.int32, SEGMENT_AXES),
                   _Leaf((batch,), jnp.int32, LENGTH_AXES))


def _is_triple(x) -> bool:
    return isinstance(x, _Leaf)


def cache_shardings(config: MistralConfig, batch: int, length: int, mesh, *, dtype=None,
                    kv_dtype=None, per_layer: bool = False) -> KVCache:
    """A KVCache of NamedShardings (from the logical axes and the mesh rules)."""
    mesh = auto_mesh(mesh)
    return jax.tree.map(lambda t: NamedSharding(mesh, logical_to_spec(t.axes, t.shape, mesh)),
                        _shapes(config, batch, length, dtype or config.compute_dtype, kv_dtype, per_layer),
                        is_leaf=_is_triple)


def abstract_cache(config: MistralConfig, batch: int, length: int, *, dtype=None, kv_dtype=None,
                   mesh=None, per_layer: bool = False) -> KVCache:
    """The cache as ShapeDtypeStructs (with shardings when a mesh is given): no memory."""
    shapes = _shapes(config, batch, length, dtype or config.compute_dtype, kv_dtype, per_layer)
    if mesh is None:
        return jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype), shapes, is_leaf=_is_triple)
    shardings = cache_shardings(config, batch, length, mesh, dtype=dtype, kv_dtype=kv_dtype, per_layer=per_layer)
    return jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), shapes, shardings,
                        is_leaf=_is_triple)


def init_cache(config: MistralConfig, batch: int, length: int, *, dtype=None, kv_dtype=None,
               mesh=None, per_layer: bool = False) -> KVCache:
    """An empty cache (all slots unfilled), built directly in its sharding when a mesh is given."""
    shapes = abstract_cache(config, batch, length, dtype=dtype, kv_dtype=kv_dtype, per_layer=per_layer)
    make = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
    if mesh is None:
        return jax.jit(make)()
    return jax.jit(make, out_shardings=cache_shardings(config, batch, length, mesh, dtype=dtype,
                                                       kv_dtype=kv_dtype, per_layer=per_layer))()


def empty_cache(config: MistralConfig, batch: int, length: int, *, dtype=None, kv_dtype=None,
                per_layer: bool = False) -> KVCache:
    """An empty cache built inside a jitted function, each leaf constrained to its logical sharding
    (under a mesh context). Inside one jit the compiler also chooses the cache's memory layout."""
    shapes = _shapes(config, batch, length, dtype or config.compute_dtype, kv_dtype, per_layer)
    return jax.tree.map(lambda t: constrain(jnp.zeros(t.shape, t.dtype), t.axes), shapes, is_leaf=_is_triple)
