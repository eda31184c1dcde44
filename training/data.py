"""Packed training data: `prepare_data` tokenizes text into memory-mapped shards, `PackedDataset` reads
batches from them as a pure function of the step.

Inside: `prepare_data(...)`, `PackedDataset` (`open`, `batch`, `row_ids`), the packer and the mixer.

On disk (one directory, written to a temporary sibling and renamed at the end, so a directory with an
`index.json` is always complete):
- `shard-NNNNN.{tokens,segment_ids,positions}.npy`: int32 [rows, seq_len] each, opened with
  `np.load(mmap_mode="r")`. int32 for all three: token ids can exceed int16, and one dtype keeps the
  reader simple; positions are stored although derivable, so the reader does no per-row work.
- `index.json`: format, seq_len, vocab_size, max_token_id, tokenizer (name, path, bos/eos/pad ids), the sources (name,
  path, weight, documents, tokens, row range [start, stop)), the shards (file names, row counts).

Packing (per source, in document order; rows never mix sources, so weights are exact):
- A document is its tokens with `<s>` (the tokenizer's post-processor; prepended here if a tokenizer
  lacks one) and `</s>` appended here. Text that spells a special token ("</s>") is encoded as text
  (`split_special_tokens=True`): a document cannot forge document boundaries.
- Documents are packed greedily into rows of seq_len tokens: a document that fits the open row joins
  it; one that does not closes the row (the rest is padding: pad id, segment 0, position 0).
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
import math
import os
import shutil
import uuid
from collections import OrderedDict

import numpy as np

from training.documents import DataError, iter_documents
from training.validate import check_token_ids, check_vocabulary

FORMAT = 1
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 256 MiB per int32 array
MIX_RESOLUTION = 4096
ARRAYS = ("tokens", "segment_ids", "positions")
_TOKENIZE_BATCH = 256


# ---------------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    """Collects finished rows and writes them as .npy shards of `rows_per_shard` rows."""

    def __init__(self, directory: str, seq_len: int, rows_per_shard: int, pad_id: int):
        self.directory, self.seq_len, self.rows_per_shard, self.pad_id = directory, seq_len, rows_per_shard, pad_id
        self.shards: list[dict] = []
        self.num_rows = 0
        self._new_buffer()

    def _new_buffer(self):
        shape = (self.rows_per_shard, self.seq_len)
        self.buf = {"tokens": np.full(shape, self.pad_id, np.int32), "segment_ids": np.zeros(shape, np.int32),
                    "positions": np.zeros(shape, np.int32)}
        self.used = 0

    def add_row(self, tokens: list[int], segments: list[int], positions: list[int]) -> None:
        n = len(tokens)
        self.buf["tokens"][self.used, :n] = tokens
        self.buf["segment_ids"][self.used, :n] = segments
        self.buf["positions"][self.used, :n] = positions
        self.used += 1
        self.num_rows += 1
        if self.used == self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.used:
            return
        entry = {"rows": self.used}
        for name in ARRAYS:
            entry[name] = f"shard-{len(self.shards):05d}.{name}.npy"
            np.save(os.path.join(self.directory, entry[name]), self.buf[name][: self.used])
        self.shards.append(entry)
        self._new_buffer()


class _Packer:
    """Greedy packing of documents into rows (see the module docstring)."""

    def __init__(self, writer: _ShardWriter):
        self.writer, self.seq_len = writer, writer.seq_len
        self.tokens: list[int] = []
        self.segments: list[int] = []
        self.positions: list[int] = []

    def add(self, doc: list[int]) -> None:
        if len(doc) > self.seq_len:
            self.close_row()
            full = len(doc) - len(doc) % self.seq_len
            for start in range(0, full, self.seq_len):
                self.writer.add_row(doc[start:start + self.seq_len], [1] * self.seq_len, list(range(self.seq_len)))
            doc = doc[full:]
            if not doc:
                return
        if len(self.tokens) + len(doc) > self.seq_len:
            self.close_row()
        segment = (self.segments[-1] + 1) if self.segments else 1
        self.tokens += doc
        self.segments += [segment] * len(doc)
        self.positions += range(len(doc))

    def close_row(self) -> None:
        if self.tokens:
            self.writer.add_row(self.tokens, self.segments, self.positions)
            self.tokens, self.segments, self.positions = [], [], []


def _check_inputs(inputs, weights, seq_len, tokenizer_dir, output_dir):
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2 (an input and its target), got {seq_len!r}")
    if not inputs:
        raise DataError("no input files")
    if len(set(inputs)) != len(inputs):
        raise DataError("an input file is given twice; list each source once")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
    if weights is not None:
        if len(weights) != len(inputs):
            raise DataError(f"{len(weights)} weights for {len(inputs)} inputs; give one weight per input")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"{tokenizer_dir}: no such tokenizer directory")
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise FileExistsError(f"{output_dir}: exists and is not an empty directory")


def prepare_data(tokenizer_dir: str, inputs: list[str], output_dir: str, seq_len: int, *,
                 weights: list[float] | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 progress: bool = True, vocab_size: int | None = None) -> dict:
    """Tokenize and pack `inputs` (one source per file) into `output_dir`; return the index.

    `vocab_size` (the model's): a tokenizer with a larger vocabulary, or any token id >= it, is refused
    (training/validate.py) before anything is written. The largest id is recorded as `max_token_id`.

    `weights` (one per input) set the sampling mix; by default each source weighs its number of rows,
    i.e. every row is equally likely. Stored in index.json; `PackedDataset.open` may override them.
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer

    _check_inputs(inputs, weights, seq_len, tokenizer_dir, output_dir)
    seq_len = int(seq_len)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_vocabulary(len(tok), vocab_size, f"{tokenizer_dir}: the tokenizer has")
    max_id = -1
    if tok.eos_token_id is None:
        raise DataError(f"{tokenizer_dir}: the tokenizer has no eos_token; documents could not be delimited")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bos_id = tok.bos_token_id

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    # A hidden sibling (same file system, so the final rename is atomic); os.mkdir keeps the umask's
    # permissions, where tempfile.mkdtemp would leave the result readable by its owner only.
    name = os.path.basename(os.path.abspath(output_dir))
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        writer = _ShardWriter(tmp, seq_len, max(1, shard_tokens // seq_len), pad_id)
        sources = []
        bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress)
        for path in inputs:  # (the bar is closed below; on an error tqdm closes it when it is collected)
            start, packer, ndocs, ntokens = writer.num_rows, _Packer(writer), 0, 0
            for texts in _batched(iter_documents(path), _TOKENIZE_BATCH):
                for j, ids in enumerate(tok(texts, split_special_tokens=True, verbose=False)["input_ids"]):
                    doc = ([bos_id] if bos_id is not None and (not ids or ids[0] != bos_id) else []) + ids
                    doc.append(tok.eos_token_id)
                    max_id = max(max_id, check_token_ids(doc, vocab_size, f"{path}: document {ndocs + j + 1}"))
                    packer.add(doc)
                    ntokens += len(doc)
                ndocs += len(texts)
                bar.update(len(texts))
            packer.close_row()
            if ndocs == 0:
                raise DataError(f"{path}: no documents")
            sources.append({"name": path, "path": os.path.abspath(path), "documents": ndocs, "tokens": ntokens,
                            "rows": [start, writer.num_rows]})
        bar.close()
        writer.flush()
        rows = [s["rows"][1] - s["rows"][0] for s in sources]
        resolved = list(weights) if weights is not None else rows
        for source, w in zip(sources, resolved):
            source["weight"] = float(w) / float(sum(resolved))
        index = {
            "format": FORMAT, "seq_len": seq_len, "num_rows": writer.num_rows, "vocab_size": len(tok),
            "max_token_id": max_id,
            "tokenizer": {"name": os.path.basename(os.path.abspath(tokenizer_dir)),
                          "path": os.path.abspath(tokenizer_dir), "bos_id": bos_id, "eos_id": tok.eos_token_id,
                          "pad_id": pad_id},
            "sources": sources, "shards": writer.shards,
        }
        with open(os.path.join(tmp, "index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1, ensure_ascii=False)
        try:
            os.rename(tmp, output_dir)  # replaces an empty directory; fails on a non-empty one
        except OSError:
            raise FileExistsError(f"{output_dir}: appeared while preparing and is not empty") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _batched(items, n):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


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
