"""Attention implementations against the `xla` reference: forward and gradients, masks, memory, dispatch.

Tolerance: float32, max |got - want| <= 1e-5 * max(1, max |want|) (gradients w.r.t. values sum over
hundreds of queries and reach ~10, where the summation order alone moves the last bits).
Splash runs its Pallas interpreter on CPU (slow), so its shapes are small: T = 300 with 128-blocks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel

from jaxmodel import MistralConfig, init_model
from jaxmodel.attention import AttentionMask, dot_product_attention, resolve_impl, xla_attention
from jaxmodel.flash_attention import flash_attention
from jaxmodel.splash import splash_attention

B, N, K = 2, 8, 2  # 4:1 grouped-query attention, NorMistral's ratio


def _inputs(seed, length, head_dim, kv_length=None):
    rng = np.random.default_rng(seed)
    kv_length = kv_length or length
    q = jnp.asarray(rng.standard_normal((B, length, N, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, kv_length, K, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, kv_length, K, head_dim)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    return q, k, v, cotangent


def _packed_segments(length):
    """Row 0: three packed documents; row 1: 17 padding tokens (id 0) then one document."""
    seg = np.ones((B, length), np.int32)
    seg[0, length // 3:] = 2
    seg[0, 5 * length // 6:] = 3
    seg[1, :17] = 0
    seg[1, 17:] = 5
    return jnp.asarray(seg)


def _assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    err, scale = np.abs(got - want).max(), max(1.0, np.abs(want).max())
    assert err <= 1e-5 * scale, f"{what}: max error {err:.3g} (reference max {scale:.3g})"


def _check_against_xla(attention, q, k, v, cotangent, mask):
    scale = q.shape[-1] ** -0.5

    @functools.partial(jax.jit, static_argnums=0)
    def output_and_grads(impl, q, k, v, cotangent):
        out, vjp = jax.vjp(lambda *a: impl(*a, mask, scale=scale), q, k, v)
        return out, vjp(cotangent)

    want, want_grads = output_and_grads(xla_attention, q, k, v, cotangent)
    got, got_grads = output_and_grads(attention, q, k, v, cotangent)
    assert got.shape == want.shape and got.dtype == want.dtype
    _assert_close(got, want, "output")
    for name, g, w in zip("qkv", got_grads, want_grads, strict=True):
        _assert_close(g, w, f"d{name}")


MASKS = {"causal": dict(causal=True), "bidirectional": dict(causal=False),
         "causal_window": dict(causal=True, window=48), "bidirectional_window": dict(causal=False, window=48)}


@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_flash_matches_xla_forward_and_gradients(mask_kind):
    # 300 tokens: not a multiple of either block; unequal query and key blocks.
    q, k, v, cotangent = _inputs(0, 300, 32)
    mask = AttentionMask.for_sequence(_packed_segments(300), **MASKS[mask_kind])
    flash = lambda *a, **kw: flash_attention(*a, **kw, block_q=128, block_k=64)  # noqa: E731
    _check_against_xla(flash, q, k, v, cotangent, mask)


def _reference_float64(q, k, v, mask: AttentionMask):
    """Attention in float64 NumPy from the mask's definition (every query sees at least itself)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    allowed = np.asarray(mask.dense())  # [B, T, S]
    kg = np.repeat(k, q.shape[2] // k.shape[2], axis=2)  # [B, S, N, H]
    vg = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, kg) * q.shape[-1] ** -0.5
    scores = np.where(allowed[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, vg)


@pytest.mark.parametrize("window", [33, 64, 65])
def test_banded_xla_attention_equals_float64_reference_and_flash_gradients(window):
    """A causal window short against the sequence takes xla_attention's banded path (query blocks over
    their band of keys): outputs equal a float64 reference of the whole masked matrix; gradients equal
    the flash kernel's (which skips blocks its own way)."""
    from jaxmodel.attention import _bands

    length = 256
    q, k, v, cotangent = _inputs(7, length, 32)
    mask = AttentionMask.for_sequence(_packed_segments(length), window=window)
    assert _bands(mask, length, length)
    out = jax.jit(lambda q, k, v: xla_attention(q, k, v, mask, scale=32 ** -0.5))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _reference_float64(q, k, v, mask), atol=2e-6)
    _check_against_xla(flash_attention, q, k, v, cotangent, mask)


@pytest.mark.parametrize("start,length", [(200, 100), (150, 1)], ids=["prefill_chunk", "decode_step"])
def test_flash_matches_xla_for_queries_over_a_longer_context(start, length):
    # Queries at positions start.. over 300 keys (T != S, query indices not 0..T-1), as a cache step does.
    q, k, v, cotangent = _inputs(1, length, 32, kv_length=300)
    segments = _packed_segments(300)
    kv_idx = jnp.broadcast_to(jnp.arange(300, dtype=jnp.int32), (B, 300))
    q_slice = slice(start, start + length)
    mask = AttentionMask(segments[:, q_slice], segments, kv_idx[:, q_slice], kv_idx, causal=True, window=64)
    flash = lambda *a, **kw: flash_attention(*a, **kw, block_q=64, block_k=128)  # noqa: E731
    _check_against_xla(flash, q, k, v, cotangent, mask)


def test_flash_decode_step_visits_only_key_blocks_up_to_its_slot():
    # One query at slot 150 of a 1024-slot cache, 128-key blocks: blocks 0 and 1 only (its 7 padding
    # queries must not widen the block's index range).
    from jaxmodel.flash_attention import _pad_vec, _Static, _visit

    kv_idx = jnp.arange(1024, dtype=jnp.int32)[None]
    vecs = (_pad_vec(jnp.ones((1, 1), jnp.int32), 8, -1), jnp.ones((1, 1024), jnp.int32),
            _pad_vec(jnp.full((1, 1), 150, jnp.int32), 8, jnp.iinfo(jnp.int32).max), kv_idx)
    visit = _visit(_Static(1.0, 8, 128, True, None, 1, 1024), *vecs)
    assert visit.tolist() == [[True, True] + [False] * 6]


SPLASH_BLOCKS = splash_kernel.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128, block_q_dkv=128,
                                         block_kv_dkv=128, block_kv_dkv_compute=128, use_fused_bwd_kernel=True)
SPLASH_BLOCKS_UNFUSED = splash_kernel.BlockSizes(block_q=128, block_kv=128, block_kv_compute=128,
                                                 block_q_dkv=128, block_kv_dkv=128, block_kv_dkv_compute=128,
                                                 block_q_dq=128, block_kv_dq=128)


@pytest.mark.parametrize("mask_kind,blocks",
                         [(kind, SPLASH_BLOCKS) for kind in MASKS] + [("causal", SPLASH_BLOCKS_UNFUSED)],
                         ids=[*MASKS, "causal_unfused_backward"])
def test_splash_matches_xla_forward_and_gradients(mask_kind, blocks):
    q, k, v, cotangent = _inputs(2, 300, 64)
    mask = AttentionMask.for_sequence(_packed_segments(300), **MASKS[mask_kind])
    splash = lambda *a, **kw: splash_attention(*a, **kw, block_sizes=blocks, interpret=True)  # noqa: E731
    _check_against_xla(splash, q, k, v, cotangent, mask)


def _walk_avals(jaxpr):
    """Every intermediate's aval in a jaxpr, sub-jaxprs (scan, while, cond, custom rules) included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "eqns"):
                    yield from _walk_avals(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _walk_avals(sub.jaxpr)


def test_flash_backward_never_builds_a_score_matrix():
    length, heads, kv_heads, head_dim = 4096, 4, 2, 64
    q = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, kv_heads, head_dim), jnp.float32)
    mask = AttentionMask.for_sequence(jnp.ones((1, length), jnp.int32))
    score_bytes = heads * length * length * 4

    def grad_of(attention):
        return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, scale=0.125)), argnums=(0, 1, 2))

    # No intermediate anywhere in the traced gradient has two axes as long as the sequence.
    big = [a.shape for a in _walk_avals(jax.make_jaxpr(grad_of(flash_attention))(q, kv, kv).jaxpr)
           if hasattr(a, "shape") and sum(d >= length for d in a.shape) >= 2]
    assert not big, f"[T, S]-sized intermediates in the flash gradient: {big[:5]}"
    # And the compiled program's scratch memory is a small fraction of one score matrix (xla's is not).
    flash_temp = jax.jit(grad_of(flash_attention)).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
    xla_temp = jax.jit(grad_of(xla_attention)).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes
    assert xla_temp >= score_bytes
    assert flash_temp < score_bytes / 4, f"flash gradient scratch {flash_temp} B vs score matrix {score_bytes} B"


@pytest.mark.parametrize("sliding_window", [None, 64])
def test_model_logits_with_flash_equal_xla(sliding_window):
    # 600 tokens: two 512-token query blocks, the second one padded; two packed documents per row.
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 1024, size=(2, 600)), jnp.int32)
    segments = jnp.asarray(np.where(np.arange(600) < 250, 1, 2)[None].repeat(2, 0), jnp.int32)
    positions = jnp.where(segments == 1, jnp.arange(600), jnp.arange(600) - 250)

    def logits(impl):
        model = init_model(MistralConfig.tiny(attention_impl=impl, sliding_window=sliding_window), seed=0)
        return jax.jit(lambda x, p, s: model(x, positions=p, segment_ids=s))(ids, positions, segments)

    want, got = logits("xla"), logits("flash")
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5


def test_auto_picks_xla_for_short_and_flash_for_long_sequences_on_cpu():
    assert resolve_impl("auto", length=1024) == "xla"
    assert resolve_impl("auto", length=1025) == "flash"
    assert resolve_impl("flash", length=8) == "flash"
    with pytest.raises(NotImplementedError, match="NVIDIA GPU"):
        resolve_impl("cudnn", length=8)
    with pytest.raises(ValueError, match="not one of"):
        resolve_impl("pallas", length=8)


def test_dispatcher_runs_splash_in_interpret_mode_off_tpu():
    q, k, v, _ = _inputs(4, 128, 64)
    mask = AttentionMask.for_sequence(_packed_segments(128))
    want = xla_attention(q, k, v, mask, scale=64 ** -0.5)
    for impl in ("splash", "flash"):
        attend = jax.jit(lambda q, k, v, impl=impl: dot_product_attention(q, k, v, mask, impl=impl))
        _assert_close(attend(q, k, v), want, impl)


def test_splash_uses_the_fused_backward_only_for_short_sequences():
    """The fused backward's per-key-block dq buffer cost 17 GiB per chip at 32K (compile-check)."""
    from jaxmodel.splash import default_block_sizes

    assert default_block_sizes(1024, 1024).use_fused_bwd_kernel
    long = default_block_sizes(32768, 32768)
    assert not long.use_fused_bwd_kernel and long.block_q_dq == 512 and long.block_kv_dq == 512
