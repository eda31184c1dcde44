"""Log-likelihood scoring of many (context, continuation) token pairs: packed rows, one jitted function.

Inside: `ScoreRequest` (one pair), `pack(requests, ...)` (the host-side plan: rows, offsets, buckets),
`Scorer(model).score(requests) -> [(logprob, greedy)]`, `row_bucket`, `score_bucket`, `ScoreError` (a
request that cannot be scored: an empty context, or a continuation longer than the window).

How a batch is built (the training data's packing, applied to evaluation requests):
- Each request is cut as lm-eval's `hf` model cuts it: the last `max_length + 1` tokens of
  context + continuation, minus the last one, are the model's input; the continuation's tokens are the
  targets of its last `len(continuation)` positions. So a context longer than the window loses tokens
  from the left, exactly as HFLM's `_loglikelihood_tokens` does.
- Requests whose input is a prefix of another's with the same context (the choices of a multiple-choice
  question: a one-token answer's input is the bare context) are scored inside that segment, at their own
  positions, instead of being computed again (HFLM does this for one-token answers).
- Segments are sorted longest first and placed first-fit into rows of R tokens: many short requests
  share a row, each its own segment (segment ids 1, 2, ... ; 0 is padding) with positions restarting
  at 0, so attention never crosses requests (the model's `segment_ids` / `positions` inputs, the same
  as packed training documents). R is a bucket (a power of two, at least `min_row`, at most
  `max_length`), the row count a power of two up to `batch_size`: few distinct shapes, few compiles.
- Only the scored positions reach the output layer: the final hidden states are gathered at the C
  continuation positions of each row (C bucketed too) before `unembed`, so the [*, V] logits exist only
  where a log-probability is read. For multiple-choice prompts (long context, a word or two of answer)
  that skips most of the output projection, which dominates the cost of a small model. The logits are
  computed in chunks of LOGIT_CHUNK scored tokens (a rolling window scores every position).
- On device, per scored token: log p(target) = logit - logsumexp, and whether argmax == target; per
  request, the sum of the first and whether every token matched (lm-eval's greedy flag), reduced with a
  scatter-add into each row's request slots. The host receives [B, C] floats and booleans.
- Ties in argmax resolve to the lowest index, as torch's argmax does.

The model is split once into (graphdef, state); the jitted function takes the state as an argument,
so a training run can score its current parameters without recompiling. The forward is the model's
own (embedding, `run_layers`, final norm; an int8 embedding is read through its QArray). On a mesh, inputs are placed
from the host copy every process holds (batch-sharded), and results are gathered to every process.

Shape letters: B rows, R row length, C scored positions per row, D hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from inference.generate import mesh_of
from jaxmodel.sharding import logical_to_spec

MIN_ROW = 512  # default shortest row: short requests are packed several to a row
MIN_SCORED = 8
LOGIT_CHUNK = 2048  # scored tokens per output-projection chunk (bounds the [chunk, V] float32 logits)


class ScoreError(ValueError):
    """A request that cannot be scored (the message says which and why, in one line)."""


class ScoreRequest(NamedTuple):
    context: Sequence[int]
    continuation: Sequence[int]


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def row_bucket(n: int, max_length: int, min_row: int = MIN_ROW) -> int:
    """Row length for a longest segment of n tokens: a power of two >= max(n, min_row), capped at max_length."""
    return min(_pow2(max(n, min_row)), max_length)


def score_bucket(n: int) -> int:
    """Scored positions per row: a power of two >= n. Not capped at the row length: requests sharing a
    segment can score more tokens than the row holds (a two-token answer and a one-token one read the
    same position)."""
    return max(_pow2(n), MIN_SCORED)


class _Segment(NamedTuple):
    index: int  # the request's position in the caller's list
    tokens: np.ndarray  # the model input (context + continuation, truncated, last token dropped)
    targets: np.ndarray  # the continuation tokens: targets of the last len(targets) input positions
    context: tuple | None  # the context tokens when nothing was truncated (requests sharing it may share rows)


class _Host(NamedTuple):
    tokens: np.ndarray  # one segment of a row
    members: list  # the _Segments scored inside it: each one's input is a prefix of `tokens`


class Batch(NamedTuple):
    ids: np.ndarray  # [B, R] int32
    positions: np.ndarray  # [B, R] int32
    segment_ids: np.ndarray  # [B, R] int32 (0: padding)
    score_index: np.ndarray  # [B, C] int32: position in the row of each scored token
    targets: np.ndarray  # [B, C] int32
    slots: np.ndarray  # [B, C] int32: the request slot of each scored token (C: padding)
    owners: list  # per row: the caller's request index of each slot


def _segments(requests: Sequence[ScoreRequest], max_length: int) -> list[_Segment]:
    out = []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context:
            raise ScoreError(f"request {i}: empty context (lm-eval gives a prefix token)")
        if len(continuation) > max_length:  # its first target would have no input position to come from
            raise ScoreError(f"request {i}: a continuation of {len(continuation)} tokens does not fit in a "
                             f"window of {max_length} tokens")
        whole = context + continuation
        kept = tuple(context) if len(whole) <= max_length + 1 else None
        whole = whole[-(max_length + 1):]
        out.append(_Segment(i, np.asarray(whole[:-1], np.int32), np.asarray(continuation, np.int32), kept))
    return out


def _hosts(segments: list[_Segment]) -> list[_Host]:
    """Requests whose model input is a prefix of another's (the choices of one multiple-choice question:
    a one-token answer's input is the bare context, a two-token answer's is context + its first token)
    are scored inside that one's segment: causal attention gives the prefix's positions the same
    hidden states either way. Only requests with the same (untruncated) context, or identical inputs, are
    compared, so the search stays within a question's few choices."""
    groups: dict = {}
    for seg in segments:
        key = ("context", seg.context) if seg.context is not None else ("input", seg.tokens.tobytes())
        groups.setdefault(key, []).append(seg)
    hosts = []
    for members in groups.values():
        members.sort(key=lambda m: -len(m.tokens))
        local: list[_Host] = []
        for m in members:
            n = len(m.tokens)
            host = next((h for h in local if np.array_equal(h.tokens[:n], m.tokens)), None)
            if host is None:
                local.append(_Host(m.tokens, [m]))
            else:
                host.members.append(m)
        hosts += local
    return hosts


def pack(requests: Sequence[ScoreRequest], *, max_length: int, batch_size: int, min_row: int = MIN_ROW,
         batch_multiple: int = 1) -> list[Batch]:
    """The batches that score `requests` (host-side plan; see the module docstring)."""
    hosts = _hosts([s for s in _segments(requests, max_length) if len(s.targets)])
    hosts.sort(key=lambda h: (-len(h.tokens), h.tokens.tobytes()))  # longest first
    batches = []
    start = 0
    while start < len(hosts):
        row_len = row_bucket(len(hosts[start].tokens), max_length, min_row)
        rows: list[list[_Host]] = []
        fill: list[int] = []
        i = start
        while i < len(hosts):
            n = len(hosts[i].tokens)
            r = next((r for r in range(len(rows)) if fill[r] + n <= row_len), None)
            if r is None:
                if len(rows) == batch_size:
                    break
                rows.append([])
                fill.append(0)
                r = len(rows) - 1
            rows[r].append(hosts[i])
            fill[r] += n
            i += 1
        start = i
        batches.append(_layout(rows, min(row_len, row_bucket(max(fill), max_length, 16)),
                               min(_pow2(len(rows)), batch_size), batch_multiple))
    return batches


def _layout(rows: list[list[_Host]], row_len: int, n_rows: int, multiple: int) -> Batch:
    n_rows = -(-n_rows // multiple) * multiple
    scored = max(sum(len(m.targets) for h in row for m in h.members) for row in rows)
    c = score_bucket(scored)
    ids = np.zeros((n_rows, row_len), np.int32)
    positions = np.zeros_like(ids)
    segment_ids = np.zeros_like(ids)
    score_index = np.zeros((n_rows, c), np.int32)
    targets = np.zeros_like(score_index)
    slots = np.full_like(score_index, c)  # c: the discarded padding slot
    owners = []
    for b, row in enumerate(rows):
        offset, k, slot = 0, 0, 0
        owners.append([])
        for number, host in enumerate(row):
            n = len(host.tokens)
            ids[b, offset:offset + n] = host.tokens
            positions[b, offset:offset + n] = np.arange(n)
            segment_ids[b, offset:offset + n] = number + 1
            for m in host.members:
                # input position p predicts token p + 1: a member's targets sit at the last positions of its
                # own input, which starts where the host starts
                end, width = offset + len(m.tokens), len(m.targets)
                score_index[b, k:k + width] = end - width + np.arange(width)
                targets[b, k:k + width] = m.targets
                slots[b, k:k + width] = slot
                owners[-1].append(m.index)
                k, slot = k + width, slot + 1
            offset += n
    return Batch(ids, positions, segment_ids, score_index, targets, slots, owners)


def _hidden(model, ids, positions, segment_ids):
    """Final normed hidden states of packed rows (causal, per segment): the model's own forward (its
    embedding reads an int8 table through the QArray)."""
    h, _ = model.hidden(ids, positions, segment_ids)
    return h


def _score(graphdef, state, ids, positions, segment_ids, score_index, targets, slots):
    """-> (sum of log p per slot [B, C], every token greedy per slot [B, C])."""
    model = nnx.merge(graphdef, state)
    h = _hidden(model, ids, positions, segment_ids)  # [B, R, D], final norm applied
    rows, c = score_index.shape
    hs = jnp.take_along_axis(h, score_index[..., None], axis=1)  # [B, C, D]
    flat_h, flat_t = hs.reshape(rows * c, 1, -1), targets.reshape(rows * c)
    chunk = min(LOGIT_CHUNK, rows * c)
    pad = -(rows * c) % chunk
    flat_h = jnp.pad(flat_h, ((0, pad), (0, 0), (0, 0)))
    flat_t = jnp.pad(flat_t, (0, pad))

    def per_chunk(args):
        x, t = args  # [chunk, 1, D], [chunk]
        logits = model.unembed(x)[:, 0]  # float32 [chunk, V]
        picked = jnp.take_along_axis(logits, t[:, None], axis=1)[:, 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == t

    logp, greedy = jax.lax.map(per_chunk, (flat_h.reshape(-1, chunk, 1, flat_h.shape[-1]),
                                           flat_t.reshape(-1, chunk)))
    logp = logp.reshape(-1)[: rows * c].reshape(rows, c)
    miss = (~greedy).reshape(-1)[: rows * c].reshape(rows, c).astype(jnp.int32)
    row = jnp.arange(rows)[:, None]
    sums = jnp.zeros((rows, c + 1), jnp.float32).at[row, slots].add(logp)[:, :c]
    misses = jnp.zeros((rows, c + 1), jnp.int32).at[row, slots].add(miss)[:, :c]
    return sums, misses == 0


_score_jit = jax.jit(_score, static_argnums=0)


class Scorer:
    """Scores ScoreRequests with a model (an nnx.Module or its (graphdef, state))."""

    def __init__(self, model, *, max_length: int, batch_size: int = 8, min_row: int = MIN_ROW):
        self.graphdef, self.state = nnx.split(model) if isinstance(model, nnx.Module) else model
        self.max_length, self.batch_size, self.min_row = int(max_length), int(batch_size), int(min_row)
        self.mesh = mesh_of(self.state)
        self.batch_multiple = 1
        if self.mesh is not None:
            self.batch_multiple = int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape]))

    def plan(self, requests: Sequence[ScoreRequest]) -> list[Batch]:
        return pack(requests, max_length=self.max_length, batch_size=self.batch_size, min_row=self.min_row,
                    batch_multiple=self.batch_multiple)

    def run_batch(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        arrays = batch[:6]
        if self.mesh is None:
            return tuple(np.asarray(a) for a in _score_jit(self.graphdef, self.state, *arrays))
        placed = []
        for a in arrays:  # from the host copy every process holds: each device gets its rows
            spec = logical_to_spec(("batch", "length"), a.shape, self.mesh)
            placed.append(jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, spec),
                                                       lambda i, a=a: a[i]))
        with jax.set_mesh(self.mesh):
            out = _score_jit(self.graphdef, self.state, *placed)
        if not out[0].is_fully_addressable:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        return tuple(np.asarray(a) for a in out)

    def score(self, requests: Sequence[ScoreRequest], progress=None) -> list[tuple[float, bool]]:
        """(sum of continuation log-probabilities, greedy) per request, in the given order. `progress`:
        a callable taking the number of requests finished by each batch (a tqdm bar's update)."""
        results: list = [(0.0, True)] * len(requests)  # empty continuations: log 1, trivially greedy
        for batch in self.plan(requests):
            sums, greedy = self.run_batch(batch)
            done = 0
            for b, owners in enumerate(batch.owners):
                for slot, index in enumerate(owners):
                    results[index] = (float(sums[b, slot]), bool(greedy[b, slot]))
                done += len(owners)
            if progress is not None:
                progress(done)
        return results
