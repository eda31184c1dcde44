"""The attention mask description shared by every attention implementation (its own module, below them all).

Inside: `AttentionMask`, which decides which key a query may see, described by per-token vectors (segment
ids and sequence indices) instead of a materialized [T, S] matrix, so blockwise kernels can build only the
blocks they need. The dispatcher (attention.py), the kernels (flash_attention.py, splash.py), context
parallelism and the model all import it from here; it imports nothing of the project, so none of them
has to import another to get it.

Mask semantics (one definition shared by every implementation): query t may attend key s iff
  q_segment_ids[t] == kv_segment_ids[s]                        (same packed document; 0 marks padding)
  and (not causal or kv_indices[s] <= q_indices[t])            (order by position in the sequence,
                                                                not by RoPE position, which restarts)
  and (window is None or q_indices[t] - kv_indices[s] < window) (Mistral's sliding window, as HF masks it)
A query always sees itself, so no softmax row is empty.

Shape letters: B batch, T query length, S key length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class AttentionMask(NamedTuple):
    q_segment_ids: jax.Array  # [B, T] int32
    kv_segment_ids: jax.Array  # [B, S] int32
    q_indices: jax.Array  # [B, T] int32, order of the query in the sequence (or the cache slot)
    kv_indices: jax.Array  # [B, S] int32
    causal: bool = True
    window: int | None = None

    @classmethod
    def for_sequence(cls, segment_ids, *, causal=True, window=None) -> AttentionMask:
        """Self-attention over one [B, T] sequence (training and prefill)."""
        batch, length = segment_ids.shape
        idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        return cls(segment_ids, segment_ids, idx, idx, causal, window)

    def dense(self) -> jax.Array:
        """The [B, T, S] boolean mask (only the reference implementations materialize it); any leading
        axes: q fields [..., T] and kv fields [..., S] -> [..., T, S] (the banded path's blocks)."""
        allowed = self.q_segment_ids[..., :, None] == self.kv_segment_ids[..., None, :]
        distance = self.q_indices[..., :, None] - self.kv_indices[..., None, :]  # >= 0 looks back
        if self.causal:
            allowed &= distance >= 0
        if self.window is not None:
            allowed &= distance < self.window
        return allowed
