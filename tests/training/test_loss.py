"""The chunked cross entropy against float64 NumPy, its memory bound, and the masked-next-token batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training.loss import MAX_SPAN, MaskingConfig, cross_entropy_sums, mask_for_mntp, mntp_start_probability


def _numpy_loss_and_grads(h, w, targets, weights):
    """Float64 reference: sum_t w_t (logsumexp(z_t) - z_t[y_t]), and its gradients w.r.t. h and W."""
    h64, w64 = h.astype(np.float64), w.astype(np.float64)
    z = h64 @ w64  # [B, T, V]
    zmax = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(-1)) + zmax[..., 0]
    target = np.take_along_axis(z, targets[..., None], -1)[..., 0]
    loss = float(np.sum(weights * (lse - target)))
    dz = np.exp(z - lse[..., None])
    np.put_along_axis(dz, targets[..., None], np.take_along_axis(dz, targets[..., None], -1) - 1.0, -1)
    dz *= weights[..., None]
    return loss, float(weights.sum()), dz @ w64.T, np.einsum("btd,btv->dv", h64, dz)


@pytest.mark.parametrize("chunk", [16, 24, 64, 1000])  # divides T, does not (padded tail), T itself, > T
def test_chunked_cross_entropy_matches_float64_numpy(chunk):
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 64, 16, 97
    h = rng.normal(size=(b, t, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 0.5).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t))
    weights = (rng.random((b, t)) < 0.7).astype(np.float32)
    expected, count, dh, dw = _numpy_loss_and_grads(h, w, targets, weights)

    def loss(h, w):
        unembed = lambda x: jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)
        return cross_entropy_sums(unembed, h, targets, weights, chunk=chunk)

    (total, n), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
    assert float(n) == count
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[0]), dh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), dw, rtol=1e-5, atol=1e-5)


def test_zero_weight_tokens_contribute_nothing_even_when_their_logits_overflow():
    h = jnp.ones((1, 8, 4))
    w = jnp.ones((4, 5)).at[:, 0].set(jnp.inf)  # every logit row holds an inf
    weights = jnp.zeros((1, 8))
    unembed = lambda x: jnp.einsum("BTD,DV->BTV", x, w)
    total, n = cross_entropy_sums(unembed, h, jnp.zeros((1, 8), jnp.int32), weights, chunk=4)
    assert float(total) == 0.0 and float(n) == 0.0


def test_backward_never_holds_the_whole_sequence_of_float32_logits():
    """The compiled gradient's temporaries stay a few chunks' logits, far below one [B, T, V] float32
    array (which the unchunked computation does hold)."""
    b, t, d, v = 1, 4096, 64, 8192
    full_logits = b * t * v * 4  # 128 MiB

    def temporaries(chunk):
        def loss(h, w):
            unembed = lambda x: jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)
            return cross_entropy_sums(unembed, h, jnp.zeros((b, t), jnp.int32), jnp.ones((b, t)), chunk=chunk)[0]

        args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    chunked, whole = temporaries(256), temporaries(t)
    assert chunked < full_logits / 4, f"{chunked / 2**20:.1f} MiB of temporaries"
    assert whole >= full_logits, f"{whole / 2**20:.1f} MiB"


# -- masked next-token prediction ------------------------------------------------------------------------


def _packed_batch(rng, rows=16, length=2048, vocab=1000):
    """Documents of 5-400 tokens packed into rows: <s> first, a few special ids inside, padding at the end."""
    ids = np.zeros((rows, length), np.int32)
    seg = np.zeros((rows, length), np.int32)
    for r in range(rows):
        t, s = 0, 1
        while t < length - 50:
            n = min(int(rng.integers(5, 400)), length - 50 - t)
            doc = rng.integers(16, vocab, size=n)
            doc[0] = 1
            doc[rng.random(n) < 0.03] = 5  # specials inside documents must never be masked
            ids[r, t:t + n], seg[r, t:t + n] = doc, s
            t, s = t + n, s + 1
    loss_mask = np.zeros_like(ids)
    loss_mask[:, :-1] = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
    return ids, seg, loss_mask


def test_mntp_start_probability_solves_the_coverage_equation():
    p = mntp_start_probability(1 / 6, MAX_SPAN)
    assert abs(2 * p * (1 - p) ** 3 - 1 / 6) < 1e-12


def test_mntp_masking_statistics():
    rng = np.random.default_rng(0)
    vocab = 1000
    ids, seg, loss_mask = _packed_batch(rng, vocab=vocab)
    cfg = MaskingConfig(vocab_size=vocab)
    fn = jax.jit(lambda key: mask_for_mntp(key, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(loss_mask), cfg))
    new_ids, targets, weights, corrupted = (np.asarray(x) for x in fn(jax.random.key(1)))

    same_doc_as_prev = np.zeros_like(corrupted)
    same_doc_as_prev[:, 1:] = (seg[:, 1:] != 0) & (seg[:, 1:] == seg[:, :-1])
    eligible = (ids >= 16) & same_doc_as_prev
    assert not (corrupted & ~eligible).any()  # no special token, no padding, no first token of a document
    fraction = corrupted.sum() / eligible.sum()
    assert abs(fraction - 1 / 6) < 0.01, fraction

    # Every corrupted run is one span of 1-3 tokens inside one document.
    lengths = []
    for r in range(corrupted.shape[0]):
        t = 0
        while t < corrupted.shape[1]:
            if corrupted[r, t]:
                start = t
                while t < corrupted.shape[1] and corrupted[r, t]:
                    t += 1
                lengths.append(t - start)
                assert len(set(seg[r, start:t])) == 1
            t += 1
    counts = np.bincount(lengths)
    assert set(np.nonzero(counts)[0]) == {1, 2, 3}, counts

    # 80% <mask>, 10% random (a changed non-special id), 10% unchanged.
    changed = new_ids[corrupted]
    original = ids[corrupted]
    is_mask = changed == 4
    is_kept = changed == original
    is_random = ~is_mask & ~is_kept
    n = corrupted.sum()
    assert abs(is_mask.sum() / n - 0.8) < 0.02
    assert abs(is_random.sum() / n - 0.1) < 0.015 + 1 / vocab
    assert abs(is_kept.sum() / n - 0.1) < 0.015 + 1 / vocab
    assert (changed[is_random] >= 16).all() and (changed[is_random] < vocab).all()
    assert (new_ids[~corrupted] == ids[~corrupted]).all()

    # Loss exactly where the next input was corrupted, predicting the original next token.
    expected_w = np.zeros_like(weights)
    expected_w[:, :-1] = corrupted[:, 1:] * loss_mask[:, :-1]
    np.testing.assert_array_equal(weights, expected_w)
    rows, cols = np.nonzero(weights)
    np.testing.assert_array_equal(targets[rows, cols], ids[rows, cols + 1])
    assert (seg[rows, cols] == seg[rows, cols + 1]).all()


def test_mntp_masking_is_a_pure_function_of_key_and_batch():
    rng = np.random.default_rng(1)
    ids, seg, loss_mask = _packed_batch(rng, rows=2, length=512)
    cfg = MaskingConfig(vocab_size=1000)
    fn = jax.jit(lambda key: mask_for_mntp(key, ids, seg, loss_mask, cfg)[0])
    a, b, c = fn(jax.random.key(3)), fn(jax.random.key(3)), fn(jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
