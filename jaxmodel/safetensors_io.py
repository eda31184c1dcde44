"""Reading and writing Hugging Face weight files one tensor at a time.

Inside:
- `WeightFiles.open(directory, allow_pickle=False)`: the tensors of a checkpoint directory (single or
  sharded `.safetensors` with their index; `pytorch_model*.bin` only when explicitly allowed), each read
  lazily by name, whole (`get`) or one box of it (`get_slice`: only that box's bytes are read).
- `bytes_read()`: the tensor bytes this process has requested from storage so far (what a sharded load
  is measured by: each host should read about its own share).
- `SafetensorsWriter`: writes a `.safetensors` file tensor by tensor, or row block by row block
  (`write_rows`; the header is computed from shapes first, so no tensor needs to wait in memory).
- `WeightFileError`: every problem, as one line naming the file and the tensor.

Why not `safetensors.safe_open(framework="numpy")`: NumPy has no bfloat16, and that is the dtype of the
real checkpoint. The format is simple (8-byte header length, a JSON header, raw little-endian data), so
each tensor is read here with one positioned read into a fresh array typed with `ml_dtypes.bfloat16`.
Not a memory map on purpose: mapped pages stay in the process's resident set once touched, so converting
a 23 GB file through a map grows RSS to the file size; a read buffer is freed as soon as the tensor is
converted, which keeps peak host memory near one tensor. Offsets are checked against the file size up
front, so a truncated download is reported before any conversion starts.

Local or `gs://` (through `jaxmodel.storage`, one code path): each file is opened once and every tensor is
one positioned (range) read of its own bytes, so a checkpoint in a bucket is streamed tensor by tensor,
never downloaded whole; the writer streams its file the same way (a resumable upload on object stores).

Sliced reads (`get_slice(name, index)`, 1-D and 2-D tensors: every Hugging Face Mistral tensor). A
row range with full rows is one contiguous read; a column range is one read per row (the row's
segment), straight into the output array for local files, and on object stores all in flight together
(`storage.read_ranges`, in batches). The bytes requested are the box's bytes, nothing more.

`.bin` files are pickles: reading one can run arbitrary code. They are read only on explicit request and
then only through `torch.load(weights_only=True)`, which refuses anything but tensors.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from jaxmodel import storage

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_RANGE_BATCH = 4096  # row segments per concurrent batch of range requests (object stores)
_BYTES_READ = [0]  # tensor bytes requested from storage by this process (headers excluded)


def bytes_read() -> int:
    """Tensor bytes this process has requested from storage through WeightFiles so far (tensors of
    pickled `.bin` files are not counted: torch reads them)."""
    return _BYTES_READ[0]


class WeightFileError(ValueError):
    """A checkpoint file problem; the message names the file (and tensor)."""


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: str) -> dict[str, _Entry]:
    """Parses and validates one file's header (does not read tensor data)."""
    size = storage.size(path)
    with storage.open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightFileError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise WeightFileError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightFileError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    entries = {}
    for name, info in header.items():
        if info.get("dtype") not in DTYPES:
            raise WeightFileError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
        if end - begin != nbytes:
            raise WeightFileError(f"{path}: tensor {name} is {end - begin} bytes, its shape {shape} needs {nbytes}")
        if 8 + n + end > size:
            raise WeightFileError(
                f"{path}: truncated safetensors file: tensor {name} ends at byte {8 + n + end}, the file has {size}"
            )
        entries[name] = _Entry(path, info["dtype"], shape, 8 + n + begin, 8 + n + end)
    return entries


class WeightFiles:
    """Name -> tensor access over all weight files of a checkpoint directory."""

    def __init__(self, entries: dict[str, _Entry], torch_files: dict[str, str]):
        self._entries = entries
        self._torch_files = torch_files  # name -> .bin file, only when pickles were allowed
        self._torch_cache: dict[str, dict] = {}
        self._handles: dict[str, object] = {}  # file -> an open binary file (one per file, reused)

    @classmethod
    def open(cls, directory: str, *, allow_pickle: bool = False) -> WeightFiles:
        listing = storage.listdir(directory)
        files = sorted(f for f in listing if f.endswith(".safetensors"))
        bins = sorted(f for f in listing if f.startswith("pytorch_model") and f.endswith(".bin"))
        if not files and bins:
            if not allow_pickle:
                raise WeightFileError(
                    f"{storage.join(directory, bins[0])}: PyTorch pickle weights are not loaded by default "
                    "(they can run code); convert them to safetensors or pass --allow-pickle"
                )
            return cls({}, _index_torch_files(directory, bins))
        if not files:
            raise WeightFileError(f"{directory}: no .safetensors weight files found")
        index_path = storage.join(directory, "model.safetensors.index.json")
        if "model.safetensors.index.json" in listing:
            weight_map = storage.read_json(index_path).get("weight_map", {})
            for name, file in weight_map.items():
                if file not in listing:
                    raise WeightFileError(f"{index_path}: tensor {name} is in missing file {file}")
            files = sorted(set(weight_map.values()))
        entries: dict[str, _Entry] = {}
        for file in files:
            for name, entry in read_safetensors_header(storage.join(directory, file)).items():
                if name in entries:
                    raise WeightFileError(f"{entry.file}: tensor {name} is also in {entries[name].file}")
                entries[name] = entry
        return cls(entries, {})

    def names(self) -> list[str]:
        return sorted(self._entries) + sorted(self._torch_files)

    def file_of(self, name: str) -> str:
        return self._entries[name].file if name in self._entries else self._torch_files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._entries:
            return self._entries[name].shape
        return tuple(self._torch_tensor(name).shape)

    def dtype(self, name: str) -> np.dtype:
        if name in self._entries:
            return DTYPES[self._entries[name].dtype]
        return self.get(name).dtype

    def get(self, name: str) -> np.ndarray:
        """The tensor as a NumPy array (read now; nothing of it is cached)."""
        return self.get_slice(name, ())

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """A box of the tensor (one unit-step slice per leading dimension; missing ones are whole), reading
        only the box's bytes (see the module docstring)."""
        if name in self._torch_files:
            return _torch_to_numpy(self._torch_tensor(name))[index]
        e = self._entries[name]
        if len(e.shape) > 2 or len(index) > len(e.shape):
            raise WeightFileError(f"{e.file}: tensor {name}: sliced reads take 1-D or 2-D tensors, "
                                  f"not shape {e.shape} with index {index}")
        box = []
        for k, n in enumerate(e.shape):
            start, stop, step = (index[k] if k < len(index) else slice(None)).indices(n)
            if step != 1:
                raise WeightFileError(f"{e.file}: tensor {name}: sliced reads take unit steps, got {index}")
            box.append((start, max(start, stop)))
        dtype = DTYPES[e.dtype]
        out = np.empty([b - a for a, b in box], dtype)
        if out.size == 0:
            return out
        rows, cols = (box[0], box[1]) if len(box) == 2 else ((0, 1), box[0]) if box else ((0, 1), (0, 1))
        width = e.shape[-1] if e.shape else 1
        row_bytes, item = width * dtype.itemsize, dtype.itemsize
        flat = out.reshape(rows[1] - rows[0], cols[1] - cols[0])
        if cols == (0, width) or rows[1] - rows[0] == 1:  # one contiguous range
            start = e.start + rows[0] * row_bytes + cols[0] * item
            self._read_into(e, name, start, memoryview(flat.reshape(-1).view(np.uint8)))
        else:
            starts = [e.start + r * row_bytes + cols[0] * item for r in range(*rows)]
            seg = (cols[1] - cols[0]) * item
            if storage.is_remote(e.file):
                for k in range(0, len(starts), _RANGE_BATCH):
                    chunk = starts[k:k + _RANGE_BATCH]
                    for j, blob in enumerate(storage.read_ranges(e.file, chunk, [s + seg for s in chunk])):
                        if len(blob) != seg:
                            raise WeightFileError(f"{e.file}: truncated safetensors file while reading tensor {name}")
                        flat[k + j] = np.frombuffer(blob, dtype)
                _BYTES_READ[0] += seg * len(starts)
            else:
                for j, start in enumerate(starts):
                    self._read_into(e, name, start, memoryview(flat[j].view(np.uint8)))
        return out

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor (along its first axis): one range read of just their bytes, so
        a large tensor can be read in pieces (how quantization at load bounds its host memory)."""
        shape = self.shape(name)
        if not 0 <= start <= stop <= shape[0]:
            raise WeightFileError(f"{name}: rows {start}:{stop} are outside its {shape[0]}")
        return self.get_slice(name, (slice(start, stop),))

    def _read_into(self, e: _Entry, name: str, start: int, buffer: memoryview) -> None:
        f = self._handles.get(e.file)
        if f is None:
            f = self._handles[e.file] = storage.open(e.file, "rb")
        f.seek(start)
        if f.readinto(buffer) != len(buffer):
            raise WeightFileError(f"{e.file}: truncated safetensors file while reading tensor {name}")
        _BYTES_READ[0] += len(buffer)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def _torch_tensor(self, name: str):
        file = self._torch_files[name]
        if file not in self._torch_cache:
            self._torch_cache = {file: _torch_load(file)}  # keep one file's tensors at a time
        return self._torch_cache[file][name]


def _torch_load(path: str) -> dict:
    import pickle
    import zipfile

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol chatter; a refusal is reported below
            # mmap needs the zip format; legacy pickles are read (still weights_only) without it.
            if storage.is_remote(path):  # a file object (no mmap): torch reads the zip through range reads
                with storage.open(path, "rb") as f:
                    return torch.load(f, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; keep only the reason, never that advice.
        reason = next(
            (
                line.strip()
                for line in str(e).splitlines()
                if line.strip().startswith(("Unsupported", "Trying to", "WeightsUnpickler error: U"))
            ),
            "the pickle contains objects other than tensors",
        )
        raise WeightFileError(
            f"{path}: refused by torch.load(weights_only=True), it may run code when unpickled ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightFileError(f"{path}: not a readable PyTorch weights file ({e})") from None


def _index_torch_files(directory: str, bins: list[str]) -> dict[str, str]:
    index_path = storage.join(directory, "pytorch_model.bin.index.json")
    if storage.exists(index_path):
        return {k: storage.join(directory, v) for k, v in storage.read_json(index_path)["weight_map"].items()}
    out = {}
    for b in bins:
        path = storage.join(directory, b)
        for name in _torch_load(path):
            out[name] = path
    return out


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class SafetensorsWriter:
    """Writes one .safetensors file whose tensor list (names, shapes, dtypes) is known up front."""

    def __init__(self, path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, (shape, dtype) in specs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {
                "dtype": DTYPE_CODES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._specs, self._order, self._next, self._path = specs, list(specs), 0, path
        self._rows = 0  # rows of the current tensor written so far
        self._f = storage.open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, array: np.ndarray) -> None:
        """Writes the next tensor whole."""
        self.write_rows(name, array)
        if self._rows:
            raise WeightFileError(f"{self._path}: tensor {name} is {array.shape}, expected {self._specs[name][0]}")

    def write_rows(self, name: str, block: np.ndarray) -> None:
        """Writes the next rows of the next tensor (blocks in order; the tensor is done when its rows are)."""
        expected = self._order[self._next] if self._next < len(self._order) else None
        shape, dtype = self._specs[expected] if expected else ((), None)
        rows = shape[0] if shape else 1
        block_rows = (block.shape[0] if block.ndim else 1) if shape else 1
        if (name != expected or block.dtype != np.dtype(dtype) or tuple(block.shape[1:]) != tuple(shape[1:])
                or block.ndim != len(shape) or self._rows + block_rows > rows):
            raise WeightFileError(
                f"{self._path}: expected rows {self._rows}.. of tensor {expected} {shape} {dtype}, got {name} "
                f"{block.shape} {block.dtype}"
            )
        self._f.write(np.ascontiguousarray(block).tobytes())
        self._rows += block_rows
        if self._rows == rows:
            self._next, self._rows = self._next + 1, 0

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shard_plan(specs: dict[str, tuple[tuple[int, ...], np.dtype]], max_bytes: int) -> Iterator[list[str]]:
    """Groups tensor names (in order) into shards of at most max_bytes (a larger tensor gets its own)."""
    group, size = [], 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group
