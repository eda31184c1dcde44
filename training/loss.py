"""Training losses: chunked next-token cross entropy, and NorMistral's masked next-token batches.

Inside:
- `cross_entropy_sums(unembed, h, targets, weights, chunk=...)`: (sum of weighted token losses, sum of
  weights) from the final hidden states, never holding the float32 logits of the whole sequence.
- `MaskingConfig`, `mask_for_mntp(key, batch, cfg)`: the masked-next-token-prediction (MNTP) variant of
  a packed batch, a pure function of (key, batch) that runs inside jit.
- `mntp_start_probability(fraction, max_span)`: the span-start rate that covers `fraction` of tokens.

Chunked cross entropy. The logits of one 32K-token NorMistral sequence are 32768 x 51200 float32 = 6.7 GB
(and their gradient as much again). The sequence is cut into chunks of `chunk` tokens; a `lax.scan`
visits them, each chunk computing unembed -> float32 logits -> logsumexp - target logit, weighted, and
summed. The chunk function is wrapped in `jax.checkpoint`, so the backward pass recomputes one chunk's
logits at a time instead of keeping every chunk's softmax: peak memory holds [B, chunk, V] float32
twice, whatever the length. The cost is one more unembedding matmul (~2 D V FLOPs per token).
Under context parallelism each chunk takes an equal part of every context shard's tokens (`_chunks`).
Returning sums (not a mean) lets microbatches and hosts be added before the one division by the token
count, so accumulated gradients equal the unaccumulated ones.

Masked next-token prediction (NorMistral's hybrid objective, "masked next-token prediction" of the
NorMistral/NorBERT work): on a fraction of the steps the model sees a corrupted input and attends
bidirectionally within each document; position t predicts the *original* token t+1 wherever the input at
t+1 was corrupted. Precisely, for a packed batch (ids, segment_ids, loss_mask):
- eligible[t]: ids[t] >= num_special_tokens, and t has a predecessor in the same document
  (segment_ids[t-1] == segment_ids[t] != 0); only eligible tokens are ever corrupted (a first token could
  be predicted from nowhere in its own document).
- spans: a candidate span starts at each eligible t with probability p; it is kept only if no candidate
  starts in the 3 positions before it (so kept spans never touch or overlap: every corrupted run is one
  span of 1-3 tokens); its length is uniform in {1, 2, 3}, cut short at the first non-eligible token
  (a special token or a document boundary). p solves 2 p (1 - p)^3 = 1/6, so in expectation 1/6 of the
  eligible tokens are corrupted (slightly less next to specials and document ends, which cut spans).
- each corrupted token independently becomes `<mask>` (80%), a uniform random id in
  [num_special_tokens, vocab) (10%), or stays itself (10%).
- loss: weight[t] = corrupted[t+1] * loss_mask[t] with target ids[t+1] (the original); corrupted[t+1]
  implies t+1 is in t's document.
All of it is elementwise work plus shifts on [B, T] arrays: no sequential scan over the sequence, so it
costs nothing next to the model even at 32K tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxmodel.context_parallel import context_size
from jaxmodel.sharding import constrain, logical_to_spec

MAX_SPAN = 3
LOGITS_AXES = ("batch", "length", "act_vocab")


def _chunks(h, targets, weights, chunk: int):
    """[B, T, ...] -> [n, B, C, ...] chunks of C tokens for the scan; the tail padded with zero weight.

    Under a mesh with context > 1 (T split into S = context shards), chunk j takes C/S tokens from each
    shard (positions j*C/S.. of every shard's T/S), so each chunk stays split over `context` like the
    sequence and no shard's hidden states move; the loss is a sum, so the grouping changes nothing else.
    S = 1 is the plain cut into consecutive chunks."""
    batch, length = targets.shape
    shards = context_size()
    shards = shards if length % shards == 0 else 1
    local = length // shards
    per = max(1, min(chunk, length) // shards)  # tokens per shard and chunk
    pad = (-local) % per
    n = (local + pad) // per

    def split(x):
        x = x.reshape(batch, shards, local, *x.shape[2:])
        if pad:
            x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        x = x.reshape(batch, shards, n, per, *x.shape[3:])
        return jnp.moveaxis(x, 2, 0).reshape(n, batch, shards * per, *x.shape[4:])

    return split(h), split(targets), split(weights)


def cross_entropy_sums(unembed, h, targets, weights, *, chunk: int = 2048):
    """(sum_t weights[t] * -log p(targets[t]), sum_t weights[t]) over a batch, both float32 scalars.

    unembed: hidden [B, C, D] -> float32 logits [B, C, V] (e.g. `model.unembed`); h [B, T, D] final
    normed hidden states; targets [B, T] int; weights [B, T] (0/1 loss mask, any float). T need not be a
    multiple of `chunk`: the tail is padded with zero weight."""
    weights = weights.astype(jnp.float32)
    h_c, t_c, w_c = _chunks(h, targets, weights, chunk)

    def chunk_loss(h_chunk, t_chunk, w_chunk):
        logits = constrain(unembed(h_chunk), LOGITS_AXES)  # float32 [B, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        if _vocab_is_sharded(logits.shape):
            # A one-hot select: a plain reduction over the sharded vocab axis (a gather along it would
            # make the partitioner collect the logits first).
            vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
            target_logit = jnp.sum(jnp.where(vocab_ids == t_chunk[..., None], logits, 0.0), axis=-1)
        else:
            # A gather: one value per token, where the select pass over [B, C, V] (and its backward)
            # measured ~1.7x the whole loss cost on CPU for one 512-token chunk.
            target_logit = jnp.take_along_axis(logits, t_chunk[..., None], axis=-1)[..., 0]
        # where, not multiply: a token with weight 0 must not turn a non-finite logit into NaN.
        return jnp.sum(jnp.where(w_chunk != 0, (lse - target_logit) * w_chunk, 0.0))

    if h_c.shape[0] > 1:
        # The backward pass recomputes each chunk's logits rather than saving all of them (docstring).
        # A single chunk gains nothing from it: its logits are needed again as soon as the backward
        # pass starts, so saving them peaks no higher than recomputing, and costs no extra matmul.
        chunk_loss = jax.checkpoint(chunk_loss)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_c, t_c, w_c))
    return total, jnp.sum(weights)


def _vocab_is_sharded(logits_shape) -> bool:
    """Whether the current mesh (if any) splits the logits' vocab axis (tensor parallelism)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and logical_to_spec(LOGITS_AXES, logits_shape, mesh)[2] is not None


# -- masked next-token prediction ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    vocab_size: int
    mask_token_id: int = 4
    num_special_tokens: int = 16
    fraction: float = 1 / 6  # of eligible tokens, in expectation
    mask_prob: float = 0.8  # corrupted tokens that become <mask>
    random_prob: float = 0.1  # ... that become a random token (the rest stay)


@functools.cache
def mntp_start_probability(fraction: float = 1 / 6, max_span: int = MAX_SPAN) -> float:
    """p with mean_span * p * (1 - p)^max_span = fraction (a start survives the no-candidate-in-the-
    previous-max_span-positions rule with probability (1-p)^max_span), by bisection on p in (0, 1/4]."""
    mean_span = (1 + max_span) / 2
    lo, hi = 0.0, 1.0 / (max_span + 1)  # the function increases up to its maximum at 1 / (max_span + 1)
    if mean_span * hi * (1 - hi) ** max_span < fraction:
        raise ValueError(f"a masking fraction of {fraction} is not reachable with spans of 1-{max_span} tokens")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_span * mid * (1 - mid) ** max_span < fraction else (lo, mid)
    return (lo + hi) / 2


def _shift_right(x, k: int, fill):
    """x[:, t - k] at position t (fill for t < k)."""
    return jnp.pad(x[:, :-k], ((0, 0), (k, 0)), constant_values=fill)


def mask_for_mntp(key, input_ids, segment_ids, loss_mask, cfg: MaskingConfig):
    """(corrupted input_ids, targets, weights, corrupted) for masked next-token prediction.

    All [B, T]; see the module docstring for the exact definition. `corrupted` marks the positions
    whose input was changed or selected to stay (the 10% kept)."""
    k_start, k_len, k_kind, k_rand = jax.random.split(key, 4)
    ids = input_ids
    seg = segment_ids
    same_doc_as_prev = (seg != 0) & (_shift_right(seg, 1, -1) == seg)
    eligible = (ids >= cfg.num_special_tokens) & same_doc_as_prev

    p = mntp_start_probability(cfg.fraction, MAX_SPAN)
    candidate = (jax.random.uniform(k_start, ids.shape) < p) & eligible
    start = candidate
    for k in range(1, MAX_SPAN + 1):
        start = start & ~_shift_right(candidate, k, False)
    length = jax.random.randint(k_len, ids.shape, 1, MAX_SPAN + 1)
    # Token t is covered by a span starting at t - k if that span is long enough and every token from
    # t - k + 1 to t is eligible (eligibility includes "same document as the previous token").
    corrupted = start
    run = eligible
    for k in range(1, MAX_SPAN):
        corrupted = corrupted | (_shift_right(start, k, False) & (_shift_right(length, k, 0) > k) & run)
        run = run & _shift_right(eligible, k, False)

    u = jax.random.uniform(k_kind, ids.shape)
    random_ids = jax.random.randint(k_rand, ids.shape, cfg.num_special_tokens, cfg.vocab_size, dtype=ids.dtype)
    new_ids = jnp.where(corrupted & (u < cfg.mask_prob), jnp.asarray(cfg.mask_token_id, ids.dtype), ids)
    new_ids = jnp.where(corrupted & (u >= cfg.mask_prob) & (u < cfg.mask_prob + cfg.random_prob), random_ids,
                        new_ids)
    # Position t predicts the original token t+1 where t+1 was corrupted.
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
    next_corrupted = jnp.pad(corrupted[:, 1:], ((0, 0), (0, 1)))
    weights = next_corrupted.astype(jnp.float32) * loss_mask.astype(jnp.float32)
    return new_ids, targets, weights, corrupted
