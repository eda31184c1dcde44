"""The engine's ONE device step, a pure function: every token of a step's plan (decode tokens and prompt
chunks of up to R sequences) in one ragged row of T tokens through the model's forward over the page
pool, then the next token of each row that asks for one.

Inside: `StepInputs` (what the host builds per step: token ids, positions, the page table and the ragged
layout, sampling vectors), `StepOutputs` (what the host reads back), `engine_step` (the step), `pick`
(next tokens with their log-probabilities and top alternatives).

Overlap: a sequence's newest token is often still on the device when the next step is built (the engine
reads outputs one step late). `feed[t] >= 0` then says "token t is the previous step's output token of
its row feed[t]"; `prev_tokens` [R] is that previous output, passed back in without leaving the device.

Shape letters: T tokens of the step, R rows (sequences; rows >= num_seqs are padding), W pages per row,
V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from inference.engine.request import TOP_LOGPROBS
from inference.generate import greedy, sample_rows
from jaxmodel.kv_cache import Cache


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInputs:
    ids: jax.Array  # [T] int32 token ids known on the host (0 where fed or padding)
    feed: jax.Array  # [T] int32: >= 0: take prev_tokens[feed[t]] instead of ids[t]
    positions: jax.Array  # [T] int32 in-sequence positions (RoPE and cache slot)
    targets: jax.Array  # [T] int32 the next prompt token of each token (read only for prompt logprobs)
    page_table: jax.Array  # [R, W] int32
    kv_lens: jax.Array  # [R] int32 tokens of row r once this step's are written
    cu_q_lens: jax.Array  # [R + 1] int32 row r's tokens are [cu_q_lens[r], cu_q_lens[r + 1])
    num_seqs: jax.Array  # [1] int32
    logits_at: jax.Array  # [R] int32 each row's last token in this step
    temperature: jax.Array  # [R] float32 (0: greedy)
    top_k: jax.Array  # [R] int32
    top_p: jax.Array  # [R] float32
    seeds: jax.Array  # [R] int32
    streams: jax.Array  # [R] int32
    steps: jax.Array  # [R] int32 index of the token each row samples (its sampling key)
    want_top: jax.Array  # [] bool: a row asks for top-logprob alternatives (the sort runs only then)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepOutputs:
    token: jax.Array  # [R] int32 each row's next token
    logprob: jax.Array  # [R] float32 its log-probability
    top_logprobs: jax.Array  # [R, TOP_LOGPROBS] (zeros unless want_top)
    top_ids: jax.Array  # [R, TOP_LOGPROBS]
    prompt_logprobs: jax.Array | None = None  # [T] log-probability of targets[t] (prompt_lp programs only)
    prompt_top_logprobs: jax.Array | None = None  # [T, TOP_LOGPROBS] (zeros unless want_top)
    prompt_top_ids: jax.Array | None = None


def _top(logp, want):
    """The TOP_LOGPROBS best (logprobs, ids) along the last axis, or zeros unless `want` (a run-time
    flag: the sort over the vocabulary runs only in steps where a row asks for alternatives)."""
    shape = logp.shape[:-1] + (TOP_LOGPROBS,)
    return jax.lax.cond(want, lambda: tuple(jax.lax.top_k(logp, TOP_LOGPROBS)),
                        lambda: (jnp.zeros(shape, logp.dtype), jnp.zeros(shape, jnp.int32)))


def pick(logits, x: StepInputs):
    """Next tokens [R] from float32 logits [R, V] -> (token, logprob, top logprobs, top ids). Sampling runs
    only in steps where a row asks for it (temperature > 0, a run-time `cond`: a greedy step never runs the
    sort over the vocabulary), so one program serves greedy and sampled steps. A row's key is
    fold_in(fold_in(key(seed), stream), token index): its tokens do not depend on the rows around it, nor
    on a preemption that recomputes it."""
    token = greedy(logits)

    def sampled():
        keys = jax.vmap(lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t))(
            x.seeds, x.streams, x.steps)
        return jnp.where(x.temperature > 0, sample_rows(logits, keys, x.temperature, x.top_k, x.top_p), token)

    token = jax.lax.cond(jnp.any(x.temperature > 0), sampled, lambda: token)
    # log-softmax of the float32 logits, before temperature: what OpenAI and vLLM report
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    return token, chosen, *_top(logp, x.want_top)


def engine_step(graphdef, prompt_lp: bool, state, pages, prev_tokens, x: StepInputs):
    """One engine step -> (StepOutputs, the pool with this step's K/V written). prompt_lp (static): the
    forward returns logits at every token and the outputs carry each token's log-probability of its
    target (prompt logprobs), else only each row's last token's logits are computed."""
    model = nnx.merge(graphdef, state)
    ids = jnp.where(x.feed >= 0, jnp.take(prev_tokens, jnp.maximum(x.feed, 0)), x.ids)
    cache = Cache(pages=pages, page_table=x.page_table, kv_lens=x.kv_lens, cu_q_lens=x.cu_q_lens,
                  num_seqs=x.num_seqs, logits_at=None if prompt_lp else x.logits_at)
    logits, cache = model(ids[None], x.positions[None], cache=cache)
    logits = logits[0]
    if not prompt_lp:
        return StepOutputs(*pick(logits, x)), cache.pages
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_lp = jnp.take_along_axis(logp, x.targets[:, None], axis=-1)[:, 0]
    return StepOutputs(*pick(logits[x.logits_at], x), target_lp, *_top(logp, x.want_top)), cache.pages
