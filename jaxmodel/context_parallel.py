"""Context parallelism: one sequence split over the mesh's `context` axis, with causal load balancing.

Inside:
- `context_size()`: the `context` axis of the current mesh (1 without one).
- `balanced_order(length, context)`, `balance(x, context)`, `unbalance(x, context)`: the load-balanced
  token order and its inverse (NumPy on the host, jnp inside jit; axis 1 = length).
- `sequence_indices(batch, length)`: each token's index in its sequence, in the order the tokens arrive
  (0..T-1, or the balanced order under a context mesh): the attention mask's q/kv indices.
- `attention(q, k, v, mask, *, impl)`: `dot_product_attention` when context is 1; else the context-
  parallel attention below.
- `check_length(length, mesh, impl, what)`: refuses a length that 2 x context does not divide (and, for
  splash, a shard that is not a multiple of the kernel's 128-token blocks), one line naming the fix;

Design choices:
- Load balancing. With causal attention the last tokens of a sequence see all keys and the first see
  almost none, so contiguous shards would give the last shard most of the work. The sequence is cut into
  2 x context chunks; shard i holds chunks i and 2C-1-i (MaxText's layout), so every shard does the same
  attention work. The order is applied to the batch on the host (training/step.py's `put_batch`): under a
  mesh with context > 1 the model's inputs (ids, positions, segment ids) arrive in the balanced order, and
  so do its outputs. Positions stay the sequence's own (global, restarting per packed document: they are
  data), and the mask orders tokens by `sequence_indices`, so the result is exactly the unsplit one
  permuted. Everything outside attention is per token (the loss is a sum), so nothing else changes.
- All-gather of keys and values (the simplest scheme, and MaxText's default): per layer each shard
  gathers K/V of the whole sequence along `context` (in `shard_map`; its transpose, a reduce-scatter of
  dK/dV, is the backward) and attends its local queries over them. For GQA models K/V are N/K times
  smaller than the queries, so the gather moves 2 x T x K x H per layer; a ring variant would overlap it
  with compute but needs its own kernel loop for each implementation: not shipped.
- Kernels: xla, flash and cuDNN take the mask as per-token vectors, so the local queries' balanced indices
  and the gathered keys' ones give the exact mask (segment ids crossing shard boundaries included); flash
  skips the key blocks a query block cannot see, which is what the balancing evens out. Splash takes a
  static mask: it is built once over the whole [T, T] problem with the query rows in the balanced order
  (the kernel's `q_sequence`, as MaxText's load-balanced causal mask), the keys un-permuted to natural
  order, and the kernel's mask tables are split over `context` with the queries (`q_seq_shards`).
  Bidirectional attention without a window (the masked objective) allows every pair of a document in any
  key order: there each shard runs the plain kernel over its queries and the gathered keys.
- Hosts: each host reads only the rows and sequence columns its own devices hold (training/step.py
  `batch_part`), so context groups may span hosts; `sharding.make_mesh` still keeps them within one host
  where the sizes allow (the all-gathers then stay on a host's fast links).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxmodel.attention import dot_product_attention, resolve_impl
from jaxmodel.masks import AttentionMask
from jaxmodel.sharding import ShardingError, logical_to_spec, platform

CONTEXT = "context"
_SPLASH_BLOCK = 128  # the splash kernel's smallest query block (TPU lanes)


def context_size(mesh=None) -> int:
    """The size of the `context` axis of `mesh` (default: the current abstract mesh); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else dict(mesh.shape).get(CONTEXT, 1)


@functools.cache
def balanced_order(length: int, context: int) -> np.ndarray:
    """The token order under `context` shards: chunks 0, 2C-1, 1, 2C-2, ... of length / (2C) tokens, so that
    shard i (a contiguous slice of the order) holds chunks i and 2C-1-i. int32 [length]."""
    if length % (2 * context):
        raise ValueError(f"length {length} is not divisible by 2 x context = {2 * context}")
    chunk = length // (2 * context)
    chunks = [c for i in range(context) for c in (i, 2 * context - 1 - i)]
    order = np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks]).astype(np.int32)
    order.flags.writeable = False
    return order


def _take(x, order):
    return np.take(x, order, axis=1) if isinstance(x, np.ndarray) else jnp.take(x, jnp.asarray(order), axis=1)


def balance(x, context: int):
    """x [B, T, ...] in sequence order -> the balanced order (unchanged when context is 1)."""
    return x if context == 1 else _take(x, balanced_order(x.shape[1], context))


def unbalance(x, context: int):
    """The inverse of `balance`."""
    return x if context == 1 else _take(x, np.argsort(balanced_order(x.shape[1], context)))


def sequence_indices(batch: int, length: int) -> jax.Array:
    """[B, T] int32: each token's index in its sequence, in the order the tokens arrive (module docstring)."""
    context = context_size()
    idx = np.arange(length, dtype=np.int32) if context == 1 else balanced_order(length, context)
    return jnp.broadcast_to(jnp.asarray(idx), (batch, length))


def check_length(length: int, mesh, impl: str, what: str = "train.seq_len") -> None:
    """Refuses (ShardingError, one line) a sequence length the mesh's context axis cannot balance."""
    context = context_size(mesh)
    if context == 1:
        return
    if length % (2 * context):
        raise ShardingError(
            f"{what}={length} is not divisible by 2 x context = {2 * context} (mesh context={context}): each "
            f"context shard holds two equal chunks of every sequence; use a multiple of {2 * context} or a "
            "smaller mesh.context")
    shard = length // context
    if impl == "splash" and shard % _SPLASH_BLOCK:
        raise ShardingError(
            f"{what}={length} gives {shard} tokens per context shard (mesh context={context}); splash attention "
            f"needs a multiple of {_SPLASH_BLOCK}: make {what} a multiple of {_SPLASH_BLOCK * context}")


def attention(q, k, v, mask: AttentionMask, *, impl: str = "auto"):
    """q [B,T,N,H], k/v [B,T,K,H] self-attention over a sequence -> [B,T,N,H] (see the module docstring)."""
    context = context_size()
    if context == 1:
        return dot_product_attention(q, k, v, mask, impl=impl)
    check_length(q.shape[1], jax.sharding.get_abstract_mesh(), impl, "the sequence length")
    impl = resolve_impl(impl, length=q.shape[1] // context, dtype=q.dtype)
    return _gathered(q, k, v, mask, impl)


def _specs(q, k):
    """(q spec, kv spec, per-token vector spec, context-sharded kernel spec) for `shard_map`: batch as the
    activations, length over `context`, heads over `tensor` only when query and KV heads both divide
    (whole GQA groups per device; see attention._per_device)."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = logical_to_spec(("batch",), q.shape[:1], mesh)[0]
    q_heads = logical_to_spec(("act_heads",), q.shape[2:3], mesh)[0]
    kv_heads = logical_to_spec(("act_kv_heads",), k.shape[2:3], mesh)[0]
    if q_heads != kv_heads:
        q_heads = kv_heads = None
    return P(batch, CONTEXT, q_heads, None), P(batch, CONTEXT, kv_heads, None), P(batch, CONTEXT), q_heads


def _gathered(q, k, v, mask: AttentionMask, impl: str):
    """All-gather K/V along `context`, then attend the local queries (module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    context = context_size(mesh)
    q_spec, kv_spec, ids, heads = _specs(q, k)
    scale = q.shape[-1] ** -0.5
    gather = functools.partial(jax.lax.all_gather, axis_name=CONTEXT, axis=1, tiled=True)

    if impl == "splash" and not mask.causal and mask.window is None:
        # Every pair of a document may meet: the key order does not matter, so each shard runs the plain
        # kernel over its queries and the gathered keys (splash's split tables need a partial block).
        from jaxmodel.splash import splash_attention

        def local(q, k, v, q_seg, kv_seg):
            local_mask = AttentionMask(q_seg, gather(kv_seg), q_seg, gather(kv_seg), causal=False)
            return splash_attention(q, gather(k), gather(v), local_mask, scale=scale,
                                    interpret=platform() != "tpu")

        return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids, ids), out_specs=q_spec,
                             check_vma=False)(q, k, v, mask.q_segment_ids, mask.kv_segment_ids)
    if impl == "splash":
        local_heads = q.shape[2] // (1 if heads is None else dict(mesh.shape)[heads])
        kernel = _splash_kernel(mask, local_heads, q.shape[1], context)
        # The mask tables follow the queries over `context`; every head shares one mask (not split).
        kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, CONTEXT)))

        def local(kernel, q, k, v, q_seg, kv_seg):
            # Keys back in sequence order: the kernel's static mask speaks of key positions.
            k, v, kv_seg = (unbalance(gather(x), context) for x in (k, v, kv_seg))
            return _run_splash(kernel, q, k, v, q_seg, kv_seg, scale)

        return jax.shard_map(local, mesh=mesh, in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, ids, ids),
                             out_specs=q_spec, check_vma=False)(kernel, q, k, v, mask.q_segment_ids,
                                                                 mask.kv_segment_ids)

    def local(q, k, v, q_seg, kv_seg, q_idx, kv_idx):
        local_mask = AttentionMask(q_seg, gather(kv_seg), q_idx, gather(kv_idx), mask.causal, mask.window)
        return dot_product_attention(q, gather(k), gather(v), local_mask, impl=impl)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids, ids, ids, ids),
                         out_specs=q_spec, check_vma=False)(q, k, v, *mask[:4])


def _splash_kernel(mask: AttentionMask, heads: int, length: int, context: int):
    """The splash kernel over the whole [T, T] problem, query rows in the balanced order, its mask tables
    split over `context` (`q_seq_shards`)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    from jaxmodel.splash import default_block_sizes

    shape = (length, length)
    if mask.window is not None:
        head_mask = splash_mask.LocalMask(shape, (mask.window - 1, 0 if mask.causal else None), offset=0)
    else:
        head_mask = splash_mask.CausalMask(shape)  # (bidirectional without a window: `_gathered`)
    head_mask.q_sequence = balanced_order(length, context).copy()  # rows: the queries' sequence indices
    sizes = default_block_sizes(min(length // context, 512), length)
    return splash_kernel.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                         head_shards=1, q_seq_shards=context,
                                         interpret=platform() != "tpu")


def _run_splash(kernel, q, k, v, q_seg, kv_seg, scale):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel

    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)  # as splash.py: scale in float32, round once
    segments = splash_kernel.SegmentIds(q=q_seg.astype(jnp.int32), kv=kv_seg.astype(jnp.int32))
    out = jax.vmap(kernel, in_axes=(0, 0, 0, 0))(qs.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                                 v.transpose(0, 2, 1, 3), segments)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
