"""Packed training data: `PackedDataset` reads batches from the memory-mapped shards that
`training.prepare.prepare_data` writes, as a pure function of the step.

Inside: `PackedDataset` (`open`, `batch`, `row_ids`), the mixer, the index format's constants.

On disk (one directory; `index.json` is written last, so a directory with an `index.json` is complete):
- `unit-UUUUUU-SSS.{tokens,segment_ids,positions}.npy` (any names the index lists, relative to the
  directory): int32 [rows, seq_len] each, opened with
  `np.load(mmap_mode="r")`. int32 for all three: token ids can exceed int16, and one dtype keeps the
  reader simple; positions are stored although derivable, so the reader does no per-row work.
- `index.json`: format, seq_len, vocab_size, max_token_id, tokenizer (name, path, bos/eos/pad ids), the
  sources (name, path, weight, documents, tokens, row range [start, stop)), the shards (file names, rows).

Packing (training/prepare.py: per work unit, in document order; rows never mix sources, so weights are exact):
- A document is its tokens with `<s>` (the tokenizer's post-processor; prepended here if a tokenizer
  lacks one) and `</s>` appended here. Text that spells a special token ("</s>") is encoded as text
  (`split_special_tokens=True`): a document cannot forge document boundaries.
- Documents are packed greedily into rows of seq_len tokens: a document that fits the open row joins
  it; one that does not closes the row (the rest is padding: pad id, segment 0, position 0), and so
  does the end of a work unit.
- A document longer than seq_len is cut into seq_len-token chunks that fill rows of their own; its last
  partial chunk opens a new row that later documents may join. Positions restart at 0 in every chunk:
  a row is all the model sees, and positions past seq_len would be ones it never learns a context for.
- `segment_ids` count 1, 2, 3, ... per document (or chunk) within a row; 0 only for padding.

Batches (`PackedDataset.batch`) are a pure function of (step, process_index, process_count, seed): no
iterator state, so a resumed run sees exactly the batches it would have seen.
- Mixing: the stream of sample slots is cut into blocks of R >= 4096 slots (a multiple of the global
  batch). Each block holds a fixed number of slots per source (largest-remainder rounding of R *
  weight), in a seeded random order. The k-th slot of a source thus has a closed form, and over any
  block the mix matches the weights to 1/R.
- Rows: the k-th draw of source s is row `perm(seed, s, epoch)[k % rows_s]`, epoch = k // rows_s,
  with `perm = np.random.default_rng([seed, s, epoch]).permutation`: every row once per epoch of its
  source, a fresh order each epoch.
- A process takes its contiguous slice of the global batch and reads only those rows from the shards.
- `targets` are the inputs shifted left within the row; `loss_mask` is 1 where the target is the next
  token of the same document (so 0 after `</s>`, on padding and at the row's last position).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np

from training.documents import DataError

FORMAT = 1
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 256 MiB per int32 array
MIX_RESOLUTION = 4096
ARRAYS = ("tokens", "segment_ids", "positions")


# ---------------------------------------------------------------------------------------------------
# Reading


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (ties to the earlier source)."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


class _LRU(OrderedDict):
    """A tiny bounded cache for values that are pure functions of their key."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class PackedDataset:
    """A prepared data directory; `batch(step, ...)` gives one process's slice of a global batch."""

    def __init__(self, directory: str, index: dict, weights: np.ndarray):
        self.directory, self.index = directory, index
        self.seq_len: int = index["seq_len"]
        self.num_rows: int = index["num_rows"]
        self.vocab_size: int = index["vocab_size"]
        self.pad_id: int = index["tokenizer"]["pad_id"]
        self.source_names = [s["name"] for s in index["sources"]]
        self.source_starts = np.array([s["rows"][0] for s in index["sources"]], np.int64)
        self.source_rows = np.array([s["rows"][1] - s["rows"][0] for s in index["sources"]], np.int64)
        self.weights = weights
        self.shard_starts = np.cumsum([0] + [s["rows"] for s in index["shards"]])
        self._memmaps: dict[tuple[int, str], np.ndarray] = {}
        self._blocks = _LRU(4)
        self._perms = _LRU(2 * len(self.source_names) + 2)

    @classmethod
    def open(cls, directory: str, *, weights: list[float] | None = None) -> PackedDataset:
        """Open `directory` (from `prepare_data`); `weights` (one per source) override the stored mix."""
        path = os.path.join(directory, "index.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: not a prepared data directory (no index.json)")
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            raise DataError(f"{path}: format {index.get('format')!r}, this reader knows {FORMAT}")
        for shard in index["shards"]:
            for name in ARRAYS:
                if not os.path.isfile(os.path.join(directory, shard[name])):
                    raise FileNotFoundError(f"{directory}: shard file {shard[name]} is missing")
        stored = [s["weight"] for s in index["sources"]]
        if weights is not None and len(weights) != len(stored):
            names = ", ".join(s["name"] for s in index["sources"])
            raise DataError(f"{len(weights)} weights for {len(stored)} sources ({names})")
        w = np.asarray(stored if weights is None else weights, np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise DataError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
        return cls(directory, index, w / w.sum())

    # -- which rows ---------------------------------------------------------------------------------

    def _block(self, seed: int, block: int, size: int):
        """(source of each slot, 1-based count of that source up to the slot) for one mixing block."""
        def make():
            counts = _largest_remainder(size, self.weights)
            slots = np.random.default_rng([seed, len(self.weights), block, size]).permutation(
                np.repeat(np.arange(len(counts)), counts))
            rank = np.zeros(size, np.int64)
            for s in range(len(counts)):
                mine = slots == s
                rank[mine] = np.arange(1, mine.sum() + 1) + block * counts[s]
            return slots, rank
        return self._blocks.get_or((seed, block, size), make)

    def _permutation(self, seed: int, source: int, epoch: int) -> np.ndarray:
        return self._perms.get_or((seed, source, epoch), lambda: np.random.default_rng(
            [seed, source, epoch]).permutation(int(self.source_rows[source])))

    def row_ids(self, step: int, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                seed: int = 0) -> np.ndarray:
        """Global row ids of this process's slice of the batch at `step` (int64 [global // count])."""
        if step < 0 or global_batch_size <= 0 or seed < 0:
            raise DataError(f"need step >= 0, global_batch_size > 0 and seed >= 0, got {step}, {global_batch_size} "
                            f"and {seed}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} is not in [0, {process_count})")
        if global_batch_size % process_count:
            raise DataError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
        local = global_batch_size // process_count
        first = step * global_batch_size + process_index * local
        slots = np.arange(first, first + local, dtype=np.int64)
        # Blocks are a whole number of global batches, so one batch never straddles two blocks.
        size = global_batch_size * max(1, -(-MIX_RESOLUTION // global_batch_size))
        block_slots, block_rank = self._block(seed, int(first // size), size)
        offset = slots % size
        source, draw = block_slots[offset], block_rank[offset] - 1  # draw: 0-based count within the source
        rows = np.empty(local, np.int64)
        for s in np.unique(source):
            mine = source == s
            n = int(self.source_rows[s])
            epochs, within = np.divmod(draw[mine], n)
            picked = np.empty(mine.sum(), np.int64)
            for e in np.unique(epochs):
                sel = epochs == e
                picked[sel] = self._permutation(seed, int(s), int(e))[within[sel]]
            rows[mine] = self.source_starts[s] + picked
        return rows

    # -- reading them -------------------------------------------------------------------------------

    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._memmaps:
            path = os.path.join(self.directory, self.index["shards"][shard][name])
            self._memmaps[key] = np.load(path, mmap_mode="r")
        return self._memmaps[key]

    def read_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """tokens, segment_ids, positions of the given global rows (in that order), int32 [len(rows), seq_len].
        Only these rows are read from the memory maps."""
        out = {name: np.empty((len(rows), self.seq_len), np.int32) for name in ARRAYS}
        shard_of = np.searchsorted(self.shard_starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            mine = np.nonzero(shard_of == shard)[0]
            local = rows[mine] - self.shard_starts[shard]
            for name in ARRAYS:
                out[name][mine] = self._array(int(shard), name)[local]
        return out

    def batch(self, step: int, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
              seed: int = 0) -> dict[str, np.ndarray]:
        """This process's slice of the global batch at `step`: int32 [global_batch_size // process_count,
        seq_len] arrays input_ids, segment_ids, positions, targets, loss_mask."""
        rows = self.row_ids(step, global_batch_size=global_batch_size, process_index=process_index,
                            process_count=process_count, seed=seed)
        data = self.read_rows(rows)
        tokens, segments = data["tokens"], data["segment_ids"]
        targets = np.full_like(tokens, self.pad_id)
        targets[:, :-1] = tokens[:, 1:]
        loss_mask = np.zeros_like(tokens)
        loss_mask[:, :-1] = (segments[:, :-1] != 0) & (segments[:, 1:] == segments[:, :-1])
        return {"input_ids": tokens, "segment_ids": segments, "positions": data["positions"],
                "targets": targets, "loss_mask": loss_mask}
