"""The Mistral decoder (Flax NNX): NorMistral-11b-long and any config.json-described Mistral.

Inside: `RMSNorm`, `rope_cos_sin` / `apply_rope`, `Attention`, `MLP`, `DecoderLayer`,
`MistralForCausalLM`, `unstack_layers` (the stack as one module per layer, for inference on CPU), and
`init_model` / `abstract_model` helpers.

One network: `model(ids, positions, segment_ids)` is the training forward, and the same call with
`cache=` (a `jaxmodel.kv_cache.KVCache`) and `write_index=` is prefill and decode: each layer writes its
new keys/values into the cache (carried through the layer scan, updated in place) and attends over it;
it then returns (logits, cache). There is no second copy of the layer stack anywhere.

Numerics follow transformers' `MistralForCausalLM` (the parity reference):
- RMSNorm: the input is cast to float32, normalized, cast back to the input dtype, *then* scaled by the
  weight (the reference's order; scaling in float32 would round differently in bfloat16).
- RoPE: inverse frequencies 1 / theta ** (arange(0, H, 2) / H) and the angles position * inv_freq are
  computed elementwise in float32 exactly as the reference does; cos/sin are then cast to the compute
  dtype. Rotate-half layout (the first half of each head pairs with the second half), not interleaved.
- Attention scores and softmax in float32 (see attention.py); logits are returned in float32.

Parameters are stored as [layers, ...] stacks (built with `nnx.vmap`), so the same tree serves the
scanned (`scan_layers=True`, flat compile time in depth) and the unrolled execution, and checkpoints do
not depend on that choice. Every parameter carries logical axis names in its `out_sharding` metadata
(`vocab`, `embed`, `q_heads`, `kv_heads`, `head_dim`, `mlp`, `norm`, `layers`); the sharding rules map
them to mesh axes. Kernels keep heads as their own axis ([D, N, H], not [D, N*H]) so that rules can
shard heads and einsums read as shapes.

Shape letters: B batch, T length, D hidden, N query heads, K kv heads, G = N // K, H head_dim,
F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmodel.attention import AttentionMask, dot_product_attention
from jaxmodel.config import MistralConfig
from jaxmodel.kv_cache import (
    KVCache,
    blocked_cached_attention,
    cache_mask,
    cached_attention,
    kv_block,
    layer_of,
    layer_shape,
    take_rows,
    write_kv,
    write_segments,
)
from jaxmodel.sharding import constrain, under_auto_axes

_INIT = nnx.initializers.normal(stddev=0.02)  # transformers' initializer_range default
ACT_BTD = ("batch", "length", "act_embed")  # logical axes of the residual stream


def _param(rngs: nnx.Rngs, shape, axes, dtype, init=_INIT) -> nnx.Param:
    # eager_sharding=False: logical names are metadata here; sharding.py places arrays on a mesh.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = _param(rngs, (dim,), ("norm",), dtype, init=nnx.initializers.ones)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * normed


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin tables [B, T, H] for integer positions [B, T], computed as the reference does."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponent)  # float32 pow, as torch computes it
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2], elementwise float32
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, heads, H]; cos/sin [B, T, H]; rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
    def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
        d, n, k, h, dt = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.weight_dtype,
        )
        self.q_proj = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dt)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dt)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dt)
        self.o_proj = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dt)

    def qkv(self, x, cos, sin):
        """Projections with RoPE applied: q [B,T,N,H], k/v [B,T,K,H]."""
        dt = x.dtype
        q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(dt))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o):
        return jnp.einsum("BTNH,NHD->BTD", o, self.o_proj[...].astype(o.dtype))

    def __call__(self, x, cos, sin, mask: AttentionMask, impl: str, kv=None):
        """Without `kv`: self-attention over x. With `kv` = (layer index, (k, v, k_scale, v_scale) caches,
        write_index, mode, cache rows or None): the new keys/values are written into the cache first;
        mode "fresh" (the cache held nothing before) attends over the new tokens alone with `impl`, "xla"
        over the whole cache masked, "blocked" over key blocks up to the last slot written. Returns
        (out, caches or None)."""
        q, k, v = self.qkv(x, cos, sin)
        if kv is None:
            return self.out(dot_product_attention(q, k, v, mask, impl=impl)), None
        i, (ck, cv, cks, cvs), write_index, mode, rows = kv
        ck, cks = write_kv(ck, cks, k, i, write_index, rows)
        cv, cvs = write_kv(cv, cvs, v, i, write_index, rows)
        if mode == "fresh":
            o = dot_product_attention(q, k, v, mask, impl=impl)
        else:
            layer = [take_rows(layer_of(c, i), rows) for c in (ck, cv, cks, cvs)]  # this layer; its rows
            if mode == "blocked":
                o = blocked_cached_attention(q, *layer[:2], mask, write_index, *layer[2:],
                                             block=kv_block(layer_shape(ck)[2]))
            else:
                o = cached_attention(q, *layer[:2], mask, *layer[2:])
        return self.out(o), (ck, cv, cks, cvs)


class MLP(nnx.Module):
    def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
        d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), dt)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), dt)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), dt)

    def __call__(self, x):
        dt = x.dtype
        gate = jnp.einsum("BTD,DF->BTF", x, self.gate_proj[...].astype(dt))
        up = jnp.einsum("BTD,DF->BTF", x, self.up_proj[...].astype(dt))
        return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down_proj[...].astype(dt))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.weight_dtype, rngs=rngs)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.weight_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask: AttentionMask, impl: str, kv=None):
        o, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, impl, kv)
        x = x + o
        return x + self.mlp(self.post_attention_layernorm(x)), kv


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class MistralForCausalLM(nnx.Module):
    def __init__(self, config: MistralConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.weight_dtype)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return DecoderLayer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.weight_dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.weight_dtype)

    @property
    def unstacked(self) -> bool:
        """Whether the layers are one module each (`unstack_layers`) rather than one stack."""
        return isinstance(self.layers, nnx.List)

    def embed(self, input_ids):
        w = self.embed_tokens[...]
        if not isinstance(w, jax.Array):  # a quantized table (inference's QArray) gathers its own rows
            return w.take(input_ids, self.config.compute_dtype)
        return jnp.take(w, input_ids, axis=0).astype(self.config.compute_dtype)

    def unembed(self, x):
        """Final hidden states [B,T,D] (already normed) -> float32 logits [B,T,V]."""
        if self.config.tie_word_embeddings:
            w = self.embed_tokens[...].astype(x.dtype)
            return jnp.einsum("BTD,VD->BTV", x, w, preferred_element_type=jnp.float32)
        w = self.lm_head[...].astype(x.dtype)
        return jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)

    def run_layers(self, x, cos, sin, mask: AttentionMask, *, collect: bool = False, kv=None):
        """All decoder layers over x [B,T,D]; with `collect`, also each layer's output [L,B,T,D].
        With `kv` = (caches, write_index, mode, cache rows) (see `Attention`), the caches ride in the scan's carry
        (each layer updates its slice in place) and come back as the second output."""
        cfg = self.config
        impl = cfg.attention_impl

        def layer_step(layer, carry, i):
            h, caches = carry
            layer_kv = None if caches is None else (i, caches, *kv[1:])
            h, caches = layer(h, cos, sin, mask, impl, layer_kv)
            return constrain(h, ACT_BTD), caches  # layer boundary: batch-sharded, model dim whole

        carry = (x, None if kv is None else kv[0])
        if kv is not None and isinstance(kv[0][0], tuple) and not self.unstacked:
            raise ValueError("a per-layer KV cache needs unstacked layers (jaxmodel.model.unstack_layers)")
        if self.unstacked:  # each layer its own arrays
            outputs = []
            for i, layer in enumerate(self.layers):
                carry = layer_step(layer, carry, i)
                outputs.append(carry[0])
            return carry[0], (jnp.stack(outputs) if collect else None), carry[1]
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            layer_state, i = xs
            carry = layer_step(nnx.merge(graphdef, layer_state), carry, i)
            return carry, (carry[0] if collect else None)

        if cfg.remat != "none" and kv is None:
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat])
        layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
        if cfg.scan_layers or kv is not None:  # a cache always scans: the carry is updated in place
            (x, caches), per_layer = jax.lax.scan(body, carry, (state, layer_ids))
            return x, per_layer, caches
        outputs = []
        for i in range(cfg.num_hidden_layers):
            carry, y = body(carry, (jax.tree.map(lambda a, i=i: a[i], state), layer_ids[i]))
            outputs.append(y)
        return carry[0], (jnp.stack(outputs) if collect else None), None

    @under_auto_axes  # a user's jax.set_mesh(jax.make_mesh(...)) has Explicit axes (sharding.py)
    def hidden(self, input_ids, positions=None, segment_ids=None, *, causal: bool = True, collect: bool = False):
        """Final normed hidden states [B,T,D], and (embeddings, per-layer outputs) when `collect`.

        positions [B,T] (default 0..T-1) feed RoPE and may restart per packed document;
        segment_ids [B,T] (default all 1) restrict attention to tokens of the same document;
        causal=False attends bidirectionally within each document (the masked-token objective)."""
        cfg = self.config
        batch, length = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        mask = AttentionMask.for_sequence(segment_ids, causal=causal, window=cfg.sliding_window)
        x = constrain(self.embed(input_ids), ACT_BTD)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        h, per_layer, _ = self.run_layers(x, cos, sin, mask, collect=collect)
        return self.norm(h), (x, per_layer)

    @under_auto_axes
    def __call__(self, input_ids, positions=None, segment_ids=None, *, return_hidden_states: bool = False,
                 cache: KVCache | None = None, write_index=0, cache_rows=None, cache_attention: str = "auto",
                 last_only: bool = False, logits_at=None, prompt_window: int | None = None):
        """input_ids [B,T] -> float32 logits [B,T,V] (arguments as in `hidden`).

        With return_hidden_states, returns (logits, hidden [L+1,B,T,D]): the embeddings, then each
        layer's output, the last one after the final norm (as transformers reports them).

        With `cache`, the same network runs over new tokens and returns (logits, updated cache):
        positions [B,T] are required (RoPE positions of the new tokens); segment_ids [B,T] is the token
        mask (1 real, 0 padding; default all real), written as the kv segment ids of the slots
        write_index..write_index+T-1 (write_index: a scalar, or [B] for one slot per row), and
        `lengths` grows by each row's real count. cache_rows [B] (with a [B] write_index): row b of the
        new tokens is cache row cache_rows[b] of a cache with more rows (one past the end: a padding row
        that reads clipped and writes nothing); the other cache rows are untouched.
        Packed prompts ("fresh" only): segment_ids numbers several prompts in one row (1, 2, ...; 0
        padding; each attends only over its own tokens), and cache_rows / write_index are [B, T]: token
        (b, t) is written to slot write_index[b, t] of cache row cache_rows[b, t] (whose length grows by
        one).
        cache_attention: "fresh" (a promise that the cache holds nothing the new tokens may see: they
        attend over themselves with the model's attention_impl, splash included), "xla" (the whole
        cache, masked), "blocked" (key blocks up to the last slot written), "auto" (blocked if
        attention_impl is flash, else xla).
        prompt_window ("fresh" only): every (packed) prompt of this call has at most this many tokens, so
        attention may run as a sliding window of that size (exact for such prompts): the engine's packed
        calls of short prompts, where a window short against the row lets attention visit a band of keys
        instead of the whole row (`attention.xla_attention`'s banded path; splash and flash skip blocks).
        last_only: logits of the last position only ([B, 1, V]), all that generation needs; logits_at
        [B]: of that position in each row instead (a right-padded chunk's last real token), or [B, P]:
        of P positions per row ([B, P, V]: the last token of each packed prompt)."""
        if cache is None:
            h, (x, per_layer) = self.hidden(input_ids, positions, segment_ids, collect=return_hidden_states)
            logits = constrain(self.unembed(h), ("batch", "length", "act_vocab"))
            if not return_hidden_states:
                return logits
            return logits, jnp.concatenate([x[None], per_layer[:-1], h[None]], axis=0)
        cfg = self.config
        batch, length = input_ids.shape
        prompts = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        token_mask = (prompts > 0).astype(jnp.int32)
        write_index = jnp.asarray(write_index, jnp.int32)
        mode = cache_attention
        if mode == "auto":
            mode = "blocked" if cfg.attention_impl == "flash" else "xla"
        if mode not in ("fresh", "xla", "blocked"):
            raise ValueError(f"cache_attention={cache_attention!r} is not one of auto, fresh, xla, blocked")
        rows = None if cache_rows is None else jnp.asarray(cache_rows, jnp.int32)
        packed = write_index.ndim == 2
        if packed and (mode != "fresh" or rows is None or rows.shape != write_index.shape):
            raise ValueError("a write_index per token (packed prompts) needs cache_rows of its shape and "
                             "cache_attention='fresh'")
        segments = write_segments(cache.segment_ids, token_mask, write_index, rows)
        if prompt_window is not None and mode != "fresh":
            raise ValueError("prompt_window needs cache_attention='fresh'")
        if mode == "fresh":
            windows = [w for w in (cfg.sliding_window, prompt_window) if w is not None]
            mask = AttentionMask.for_sequence(prompts, causal=True, window=min(windows) if windows else None)
        else:
            mask = cache_mask(token_mask, take_rows(segments, rows), write_index, cfg.sliding_window)
        x = constrain(self.embed(input_ids), ACT_BTD)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        caches = (cache.k, cache.v, cache.k_scale, cache.v_scale)
        h, _, (k, v, ks, vs) = self.run_layers(x, cos, sin, mask, kv=(caches, write_index, mode, rows))
        if logits_at is not None:
            at = jnp.asarray(logits_at, jnp.int32)
            h = jnp.take_along_axis(h, (at[:, None] if at.ndim == 1 else at)[..., None], axis=1)
        elif last_only:
            h = h[:, -1:]
        logits = constrain(self.unembed(self.norm(h)), ("batch", "length", "act_vocab"))
        if packed:  # each token counts for its own cache row
            lengths = cache.lengths.at[rows].add(token_mask, mode="drop")
        else:
            counts = token_mask.sum(-1)
            lengths = cache.lengths + counts if rows is None else cache.lengths.at[rows].add(counts, mode="drop")
        return logits, KVCache(k, v, ks, vs, segments, lengths)


def _slice_of_stack(stacked: jax.Array, i: int) -> jax.Array:
    """stacked[i], keeping the stack's sharding of the remaining axes."""
    sharding = getattr(stacked, "sharding", None)
    part = stacked[i]
    if isinstance(sharding, NamedSharding):
        part = jax.device_put(part, NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:])))
    return part


def unstack_layers(model: MistralForCausalLM) -> MistralForCausalLM:
    """In place (and returned): the layer stack becomes an `nnx.List` of L `DecoderLayer`s, each holding
    its own arrays (their logical axes without "layers"; int8/int4 `QArray`s sliced alike); the forward
    is the same code (`run_layers` loops over the list). For inference where a stacked weight's per-layer
    slice is a copy made on every call: XLA CPU copies each layer's weights out of the stack in every
    step, scanned or unrolled (measured: a third of the tiny demo model's decode step), as MaxText serves
    from unscanned checkpoints; TPU fuses the slice into the matmul and needs none of this. Quantize
    first (quantization addresses the stack). Each stacked parameter is released once sliced, so the
    peak is one parameter's stack above the model."""
    if model.unstacked:
        return model
    cfg = model.config
    layers = [nnx.eval_shape(lambda: DecoderLayer(cfg, rngs=nnx.Rngs(0))) for _ in range(cfg.num_hidden_layers)]
    targets = [dict(nnx.to_flat_state(nnx.state(layer))) for layer in layers]
    for path, var in nnx.to_flat_state(nnx.state(model.layers)):
        stacked = var.get_value()
        for i, target in enumerate(targets):
            target[path].set_value(jax.tree.map(lambda a, i=i: _slice_of_stack(a, i), stacked))
        del stacked
        var.set_value(jnp.zeros((), jnp.int8))  # the stack's last reference
    model.layers = nnx.List(layers)
    return model


def init_model(config: MistralConfig, seed: int = 0) -> MistralForCausalLM:
    """A randomly initialized model (normal(0.02) weights, unit norms)."""
    return MistralForCausalLM(config, rngs=nnx.Rngs(seed))


def abstract_model(config: MistralConfig) -> MistralForCausalLM:
    """The model with ShapeDtypeStruct leaves: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: MistralForCausalLM(config, rngs=nnx.Rngs(0)))
