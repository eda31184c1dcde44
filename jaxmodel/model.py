"""The Mistral decoder (Flax NNX): NorMistral-11b-long and any config.json-described Mistral.

Inside: `RMSNorm`, `rope_cos_sin` / `apply_rope`, `Attention`, `MLP`, `DecoderLayer`,
`MistralForCausalLM`, `unstack_layers` (the stack as one module per layer, for inference on CPU), and
`init_model` / `abstract_model` helpers.

One network: `model(ids, positions, segment_ids)` is the training forward, and the same call with
`cache=` (a `jaxmodel.kv_cache.Cache`: the page pool, page tables and the call's ragged layout) is prefill
and decode, any mix of both in one ragged row: each layer writes its new keys/values into their pages
(the pool rides the layer scan's carry, updated in place) and attends over its sequence's pages; it then
returns (logits, cache). There is no second copy of the layer stack anywhere.

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

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmodel.config import MistralConfig
from jaxmodel.context_parallel import attention, sequence_indices
from jaxmodel.kv_cache import Cache, token_rows, write_pages
from jaxmodel.lora import mirror_adapters, project
from jaxmodel.masks import AttentionMask
from jaxmodel.paged_attention import paged_attention, paged_impl
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
        q = project(x, self, "q_proj", "BTD,DNH->BTNH")
        k = project(x, self, "k_proj", "BTD,DKH->BTKH")
        v = project(x, self, "v_proj", "BTD,DKH->BTKH")
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o):
        return project(o, self, "o_proj", "BTNH,NHD->BTD")

    def __call__(self, x, cos, sin, mask: AttentionMask | None, impl: str, kv=None):
        """Without `kv`: self-attention over x (mask and impl as `dot_product_attention`). With `kv` =
        (layer index, pool, cache, sliding window): x is the call's one ragged row [1, T, D]; the new
        keys/values are written into their pages first, then the tokens attend over their sequences'
        pages (`paged_attention` with impl "kernel" or "xla"; mask unused). Returns (out, pool or None)."""
        q, k, v = self.qkv(x, cos, sin)
        if kv is None:
            return self.out(attention(q, k, v, mask, impl=impl)), None  # split over `context` if the mesh has it
        i, pages, cache, window = kv
        pages = write_pages(pages, i, k[0], v[0], cache)
        kv_layer, scale = pages.layer(i)
        o = paged_attention(q[0], kv_layer, scale, cache, impl=impl, window=window)
        return self.out(o[None]), pages


class MLP(nnx.Module):
    def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
        d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.weight_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), dt)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), dt)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), dt)

    def __call__(self, x):
        gate = project(x, self, "gate_proj", "BTD,DF->BTF")
        up = project(x, self, "up_proj", "BTD,DF->BTF")
        return project(jax.nn.silu(gate) * up, self, "down_proj", "BTF,FD->BTD")


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.weight_dtype, rngs=rngs)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=cfg.weight_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask: AttentionMask | None, impl: str, kv=None):
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

    def run_layers(self, x, cos, sin, mask: AttentionMask | None, *, collect: bool = False,
                   cache: Cache | None = None):
        """All decoder layers over x [B,T,D]; with `collect`, also each layer's output [L,B,T,D] (second
        output). With `cache`, x is the call's ragged row [1,T,D] and the page pool rides in the scan's
        carry (each layer updates its pages in place); the pool comes back as the third output."""
        cfg = self.config
        impl = cfg.attention_impl if cache is None else paged_impl(cfg, cache.pages)

        def layer_step(layer, carry, i):
            h, pages = carry
            layer_kv = None if pages is None else (i, pages, kv, cfg.sliding_window)
            h, pages = layer(h, cos, sin, mask, impl, layer_kv)
            return constrain(h, ACT_BTD), pages  # layer boundary: batch-sharded, model dim whole

        kv = None if cache is None else dataclasses.replace(cache, pages=None)  # the pool travels in the carry
        carry = (x, None if cache is None else cache.pages)
        if cache is not None and cache.pages.per_layer and not self.unstacked:
            raise ValueError("a per-layer page pool needs unstacked layers (jaxmodel.model.unstack_layers)")
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
        causal=False attends bidirectionally within each document (the masked-token objective).
        Under a mesh whose `context` axis is > 1, tokens arrive and leave in jaxmodel.context_parallel's
        balanced order (`balance` / `unbalance`); the result is the unsplit one, permuted."""
        cfg = self.config
        batch, length = input_ids.shape
        if positions is None:
            positions = sequence_indices(batch, length)  # 0..T-1 (in context_parallel's order under a context mesh)
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        idx = sequence_indices(batch, length)  # the mask orders tokens by their index in the sequence
        mask = AttentionMask(segment_ids, segment_ids, idx, idx, causal, cfg.sliding_window)
        x = constrain(self.embed(input_ids), ACT_BTD)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        h, per_layer, _ = self.run_layers(x, cos, sin, mask, collect=collect)
        return self.norm(h), (x, per_layer)

    @under_auto_axes
    def __call__(self, input_ids, positions=None, segment_ids=None, *, cache: Cache | None = None,
                 return_hidden_states: bool = False):
        """input_ids [B,T] -> float32 logits [B,T,V] (arguments as in `hidden`).

        With return_hidden_states, returns (logits, hidden [L+1,B,T,D]): the embeddings, then each
        layer's output, the last one after the final norm (as transformers reports them).

        With `cache` (a `jaxmodel.kv_cache.Cache`), the same network runs over one ragged row of new
        tokens and returns (float32 logits [1,Q,V] at cache.logits_at (all T tokens when None), the cache
        with its pool updated): input_ids [1,T] are the call's tokens, sequence after sequence, as
        cache.cu_q_lens lays them out (each sequence's last q_len tokens); positions [1,T] are their RoPE
        positions, their positions in their sequences (None: computed from the cache's layout);
        segment_ids must be None (the cache says which tokens belong together). Every layer writes its
        new keys/values into their pages, then attends over its sequence's pages: prefill chunks and
        decode tokens of any number of sequences in one call."""
        if cache is None:
            h, (x, per_layer) = self.hidden(input_ids, positions, segment_ids, collect=return_hidden_states)
            logits = constrain(self.unembed(h), ("batch", "length", "act_vocab"))
            if not return_hidden_states:
                return logits
            return logits, jnp.concatenate([x[None], per_layer[:-1], h[None]], axis=0)
        return self._cached(input_ids, positions, segment_ids, cache, return_hidden_states)

    def _cached(self, input_ids, positions, segment_ids, cache: Cache, return_hidden_states: bool):
        """The forward over a ragged row with the paged cache (see `__call__`)."""
        if segment_ids is not None:
            raise ValueError("segment_ids must be None with a cache (cache.cu_q_lens says which tokens go together)")
        if return_hidden_states:
            raise ValueError("return_hidden_states is not available with a cache")
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"with a cache, input_ids is one ragged row [1, T], got shape {input_ids.shape}")
        cfg = self.config
        if positions is None:
            positions = token_rows(cache, input_ids.shape[1])[1][None]
        x = constrain(self.embed(input_ids), ACT_BTD)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        h, _, pages = self.run_layers(x, cos, sin, None, cache=cache)
        if cache.logits_at is not None:
            h = jnp.take(h, cache.logits_at, axis=1)
        logits = constrain(self.unembed(self.norm(h)), ("batch", "length", "act_vocab"))
        return logits, dataclasses.replace(cache, pages=pages)


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
    for layer in layers:  # LoRA adapters are attached after construction (lora.add_lora): give each its own
        mirror_adapters(layer, model.layers)
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
