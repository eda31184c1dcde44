"""Packed training data: `PackedDataset` reads batches from the memory-mapped shards that
`training.prepare.prepare_data` writes, as a pure function of the step.

Inside: `PackedDataset` (`open`, `batch`, `row_ids`), `Prefetcher`, the mixer, the index format's constants.

On disk (one directory; `index.json` is written last, so a directory with an `index.json` is complete):
- `unit-UUUUUU-SSS.{tokens,segment_ids,positions}.npy` (any names the index lists, relative to the
  directory): int32 [rows, seq_len] each, opened with
  `np.load(mmap_mode="r")`. int32 for all three: token ids can exceed int16, and one dtype keeps the
  reader simple; positions are stored although derivable, so the reader does no per-row work.
- `index.json`: format, seq_len, vocab_size, max_token_id, tokenizer (name, path, bos/eos/pad ids), the
  sources (name, path, weight, documents, tokens, row range [start, stop)), the shards (file names, rows).
- Prompt/completion data (format 2, `MASKED_FORMAT`) adds per shard `unit-UUUUUU-SSS.loss_mask.npy`, uint8
  [rows, seq_len], token-aligned: 1 where the token is one to learn (a completion token or the `</s>` after
  it), 0 on prompt tokens (`<s>` included) and padding; the index adds `instruction` (the fields and the
  template) and per source `trained_tokens`. uint8: a quarter of int32's bytes, and the mask is all it
  holds. Plain text stays format 1 with no mask (every token learned), so data prepared before reads as it
  did; a reader that knows only format 1 refuses format 2 rather than train on prompts.

Packing (training/prepare_unit.py: per work unit, in document order; rows never mix sources, so weights are exact):
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

Batches (`PackedDataset.batch`) are a pure function of (step, seed, and the part read: process_index /
process_count, or rows x columns): no iterator state, so a resumed run sees exactly the batches it would
have seen, and the parts of any split tile the one global batch.
- Mixing: the stream of sample slots is cut into blocks of R >= 4096 slots (a multiple of the global
  batch). Each block holds a fixed number of slots per source (largest-remainder rounding of R *
  weight), in a seeded random order. The k-th slot of a source thus has a closed form, and over any
  block the mix matches the weights to 1/R.
- Rows: the k-th draw of source s is row `perm(seed, s, epoch)[k % rows_s]`, epoch = k // rows_s,
  with `perm = np.random.default_rng([seed, s, epoch]).permutation`: every row once per epoch of its
  source, a fresh order each epoch.
- A process reads only its part of the global batch: by default a contiguous slice of rows; `train` asks
  for the rows x sequence columns its devices hold (training/step.py `batch_part`, from the batch's
  sharding: under context parallelism spanning hosts, a host reads only its context shards' chunks of each
  sequence, plus the one column after each run, whose token is a target). Local shards are sliced
  through memory maps (rows x column runs), shards on gs:// through concurrent range reads (one request
  per row, column run and array, all in flight together; `jaxmodel.storage.read_ranges`), each .npy
  header read once.
- `open` reads index.json only (no per-shard work, so thousands of shards open at once); a missing or
  malformed shard file is reported, by name, when a batch first needs it. On gs:// a directory whose
  upload was interrupted (no commit marker) is refused.
- `Prefetcher` computes the next steps' batches on a background thread (a bounded queue keyed by step),
  so a step does not wait for data when the loader is faster than the step.
- `targets` are the inputs shifted left within the row; `loss_mask` is 1 where the target is the next
  token of the same document (so 0 after `</s>`, on padding and at the row's last position) and, for
  prompt/completion data, that token's stored mask is 1: position t is trained iff token t+1 is one to learn.
"""

from __future__ import annotations

import io
import queue
import threading
from collections import OrderedDict

import numpy as np

from jaxmodel import storage
from training.documents import DataError

FORMAT = 1  # plain text: every token is learned
MASKED_FORMAT = 2  # prompt/completion records: a stored per-token loss mask
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens: 256 MiB per int32 array
MIX_RESOLUTION = 4096
ARRAYS = ("tokens", "segment_ids", "positions")  # int32, in every shard
MASK = "loss_mask"  # uint8, in the shards of MASKED_FORMAT data only


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
        self.masked = index["format"] == MASKED_FORMAT
        self.arrays = ARRAYS + (MASK,) if self.masked else ARRAYS
        self._arrays: dict[tuple[int, str], object] = {}
        self._blocks = _LRU(4)
        self._perms = _LRU(2 * len(self.source_names) + 2)
        self.bytes_read = 0  # bytes of shard data read so far (read_rows)

    @classmethod
    def open(cls, directory: str, *, weights: list[float] | None = None) -> PackedDataset:
        """Open `directory` (from `prepare_data`; local or gs://); `weights` (one per source) override the
        stored mix. Reads index.json only."""
        directory = storage.resolve(directory)
        path = storage.join(directory, "index.json")
        if not storage.isfile(path):
            if storage.is_remote(directory):
                storage.check_bucket(directory)
            raise FileNotFoundError(f"{directory}: not a prepared data directory (no index.json)")
        storage.require_committed(directory, "data directory")
        try:
            index = storage.read_json(path)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if index.get("format") not in (FORMAT, MASKED_FORMAT):
            raise DataError(f"{path}: format {index.get('format')!r}, this reader knows {FORMAT} and {MASKED_FORMAT}")
        if index["format"] == MASKED_FORMAT:
            unmasked = next((i for i, sh in enumerate(index["shards"]) if not isinstance(sh.get(MASK), str)), None)
            if unmasked is not None:
                raise DataError(f"{path}: format {MASKED_FORMAT} (prompt/completion data), but shard {unmasked} "
                                f"lists no {MASK} file")
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
                seed: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
        """Global row ids of this process's slice of the batch at `step` (int64 [global // count]), or of
        the batch's rows `rows` (positions in [0, global_batch_size), in the order given)."""
        if step < 0 or global_batch_size <= 0 or seed < 0:
            raise DataError(f"need step >= 0, global_batch_size > 0 and seed >= 0, got {step}, {global_batch_size} "
                            f"and {seed}")
        positions = self._positions(global_batch_size, process_index, process_count, rows)
        first = step * global_batch_size
        slots = first + positions
        # Blocks are a whole number of global batches, so one batch never straddles two blocks.
        size = global_batch_size * max(1, -(-MIX_RESOLUTION // global_batch_size))
        block_slots, block_rank = self._block(seed, int(first // size), size)
        offset = slots % size
        source, draw = block_slots[offset], block_rank[offset] - 1  # draw: 0-based count within the source
        local = len(positions)
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

    @staticmethod
    def _positions(global_batch_size: int, process_index: int, process_count: int, rows) -> np.ndarray:
        """The batch positions to read: `rows` as given, else the process's contiguous slice."""
        if rows is not None:
            if process_count != 1 or process_index != 0:
                raise DataError("give either rows or process_index/process_count, not both")
            rows = np.asarray(rows, np.int64).reshape(-1)
            if rows.size and (rows.min() < 0 or rows.max() >= global_batch_size):
                raise DataError(f"batch rows must lie in [0, {global_batch_size}), got {rows.min()}..{rows.max()}")
            return rows
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} is not in [0, {process_count})")
        if global_batch_size % process_count:
            raise DataError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
        local = global_batch_size // process_count
        return np.arange(process_index * local, (process_index + 1) * local, dtype=np.int64)

    # -- reading them -------------------------------------------------------------------------------

    def _array(self, shard: int, name: str):
        """Shard `shard`'s array `name`, indexable by an array of local rows (a memory map, or the range
        reader for gs://); opened on first use."""
        key = (shard, name)
        if key not in self._arrays:
            file = self.index["shards"][shard][name]
            path = storage.join(self.directory, file)
            expected = (self.index["shards"][shard]["rows"], self.seq_len)
            try:
                if storage.is_remote(path):
                    array = _RemoteRows(path, expected)
                else:
                    array = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.directory}: shard file {file} is missing") from None
            except ValueError as e:
                raise DataError(f"{path}: not a readable .npy shard ({e})") from None
            dtype = np.uint8 if name == MASK else np.int32
            if array.shape != expected or array.dtype != dtype:
                raise DataError(f"{path}: {array.dtype} {list(array.shape)}, index.json says {np.dtype(dtype)} "
                                f"{list(expected)}")
            self._arrays[key] = array
        return self._arrays[key]

    def read_rows(self, rows: np.ndarray, columns: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """tokens, segment_ids, positions (and, for prompt/completion data, the stored loss_mask, uint8) of the
        given global rows (in that order) at `columns` (sorted; default all), int32 [len(rows),
        len(columns)]. Only these rows and columns are read (`bytes_read` counts them)."""
        columns = np.arange(self.seq_len) if columns is None else np.asarray(columns, np.int64)
        runs = _runs(columns)
        out = {name: np.empty((len(rows), len(columns)), np.uint8 if name == MASK else np.int32)
               for name in self.arrays}
        shard_of = np.searchsorted(self.shard_starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            mine = np.nonzero(shard_of == shard)[0]
            local = rows[mine] - self.shard_starts[shard]
            for name in self.arrays:
                array, at = self._array(int(shard), name), 0
                for start, stop in runs:  # contiguous column runs: a memory-map or range-read slice each
                    whole = (start, stop) == (0, self.seq_len)
                    out[name][mine, at:at + stop - start] = array[local] if whole else array[local, start:stop]
                    at += stop - start
        self.bytes_read += sum(a.nbytes for a in out.values())
        return out

    def batch(self, step: int, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
              seed: int = 0, rows: np.ndarray | None = None, columns: np.ndarray | None = None
              ) -> dict[str, np.ndarray]:
        """This process's part of the global batch at `step`: int32 [global_batch_size // process_count,
        seq_len] arrays input_ids, segment_ids, positions, targets, loss_mask. With `rows` (batch positions)
        and/or `columns` (sorted sequence columns; training/step.py's `batch_part` says which a process's
        devices hold) the part is [len(rows), len(columns)], read from those rows and columns plus the one
        column after each run of them (a token's target is the next token)."""
        columns = np.arange(self.seq_len) if columns is None else np.asarray(columns, np.int64)
        if columns.size and (columns.min() < 0 or columns.max() >= self.seq_len or np.any(np.diff(columns) <= 0)):
            raise DataError(f"columns must be sorted, distinct and in [0, {self.seq_len})")
        ids = self.row_ids(step, global_batch_size=global_batch_size, process_index=process_index,
                           process_count=process_count, seed=seed, rows=rows)
        last = columns == self.seq_len - 1  # no next token in the row: target pad, loss weight 0
        following = np.minimum(columns + 1, self.seq_len - 1)
        needed = np.union1d(columns, following)
        data = self.read_rows(ids, needed)
        here, after = np.searchsorted(needed, columns), np.searchsorted(needed, following)
        tokens, segments = data["tokens"][:, here], data["segment_ids"][:, here]
        targets = np.where(last, self.pad_id, data["tokens"][:, after]).astype(np.int32)
        next_segments = data["segment_ids"][:, after]
        learned = (segments != 0) & (next_segments == segments) & ~last
        if self.masked:  # the target at t is token t+1: learned only where that token is
            learned &= data[MASK][:, after] != 0
        return {"input_ids": tokens, "segment_ids": segments, "positions": data["positions"][:, here],
                "targets": targets, "loss_mask": learned.astype(np.int32)}


def _runs(columns: np.ndarray) -> list[tuple[int, int]]:
    """Sorted distinct columns -> their contiguous runs [(start, stop), ...]."""
    if not columns.size:
        return []
    breaks = np.nonzero(np.diff(columns) != 1)[0] + 1
    starts, stops = columns[np.r_[0, breaks]], columns[np.r_[breaks - 1, len(columns) - 1]] + 1
    return list(zip(starts.tolist(), stops.tolist()))


class _RemoteRows:
    """Rows of one .npy shard on an object store: the header is read once, then `self[rows]` fetches
    exactly those rows with concurrent range reads."""

    def __init__(self, path: str, expected_shape: tuple[int, int]):
        self.path = path
        with storage.open(path, "rb") as f:
            head = f.read(4096)  # magic, version and header: a few hundred bytes
        stream = io.BytesIO(head)
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(stream)
        if fortran:
            raise ValueError("Fortran-ordered array")
        self.shape, self.dtype, self.offset = tuple(shape), np.dtype(dtype), stream.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __getitem__(self, key) -> np.ndarray:
        """`self[rows]` or `self[rows, start:stop]` (a column range: only its bytes of each row are fetched)."""
        rows, columns = key if isinstance(key, tuple) else (key, slice(None))
        start, stop, _ = columns.indices(self.shape[1])
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        width = (stop - start) * self.dtype.itemsize
        starts = self.offset + rows * self.row_bytes + start * self.dtype.itemsize
        try:
            blobs = storage.read_ranges(self.path, starts, starts + width)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: shard file is missing") from None
        data = b"".join(blobs)
        if len(data) != len(rows) * width:
            raise DataError(f"{self.path}: truncated shard (a row read returned fewer bytes)")
        return np.frombuffer(data, self.dtype).reshape(len(rows), stop - start)


class Prefetcher:
    """`get(step)` returns `fn(step)`; a background thread computes the following steps ahead of time,
    at most `depth` of them waiting (a bounded queue keyed by step). `fn` must be a pure function of the
    step (PackedDataset.batch is), so a prefetched batch is the batch. Asking for a step out of order
    restarts the thread from there. Errors raised by `fn` are re-raised by `get` for their step."""

    def __init__(self, fn, start: int, *, depth: int = 2):
        self._fn, self._depth = fn, depth
        self._start(start)

    def _start(self, step: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self._depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(step, self._queue, self._stop), daemon=True,
                                        name="normistral-prefetch")
        self._thread.start()

    def _run(self, step: int, q: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (step, self._fn(step), None)
            except BaseException as e:  # noqa: BLE001 (handed to the consumer)
                item = (step, None, e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int):
        while True:
            got, value, error = self._queue.get()
            if got == step:
                if error is not None:
                    raise error
                return value
            self.close()  # not the step the thread is on: start over from `step`
            self._start(step)

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
