"""Input sources for `prepare-data`: what a `--input` names, how it is cut into work units, how a unit's
documents are read. Every path goes through `jaxmodel.storage` (local or gs://, compressed or not).

Inside: `Unit` (a dict: kind, file, range, key), `expand_source(spec, ...)` -> files or a dataset,
`plan_units(source_index, spec, ...)` -> [Unit], `unit_documents(unit, text_column)` -> texts.

What one `--input` may be (one source, one weight):
- a file: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line, its string field `text`), `.txt`
  (also `.txt.gz` / `.txt.zst`; documents are blocks of lines split by blank lines), `.parquet` (the string
  column `--text-column`, default `text`); any other extension is read as plain text, as before;
- a directory or a glob (`data/*.jsonl.zst`, `gs://bkt/hplt/nb/*`): every file of a known format in it,
  in sorted order (unknown files in a directory are ignored; a glob's matches must all be known formats);
- a Hugging Face dataset saved with `save_to_disk` (a directory with `state.json`; for a DatasetDict
  name one split's subdirectory, e.g. `DIR/train`), read from its Arrow files with pyarrow;
- `hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT`: a dataset on the Hugging Face hub, streamed (needs network).

Work units (the packing order is the unit order, so the output does not depend on the worker count):
- uncompressed `.jsonl`: line-aligned byte ranges of `unit_bytes`: a unit owns the lines that *start* in
  [start, stop) (it skips the partial line it lands in, and finishes the line that crosses `stop`);
- `.parquet`: runs of whole row groups, cut when their uncompressed size reaches `unit_bytes`;
- compressed files (not seekable), `.txt` (a document may span any byte offset) and Arrow files: one unit
  per file; hub datasets: one unit per hub shard.
- A unit's key records the file's size and modification stamp: a file changed between runs gets its
  units redone, the others are kept.

Errors name the file and the record (`FILE:LINE` for JSON lines, `FILE: row N` for Parquet and Arrow).
A line number inside a byte-range unit is found on the error path only, by counting newlines before it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

from jaxmodel import storage
from jaxmodel.checks import json_problem
from training.documents import DataError, text_blocks

JSONL = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT = (".txt", ".txt.gz", ".txt.zst")
PARQUET = (".parquet",)
KNOWN = JSONL + TEXT + PARQUET
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
DEFAULT_UNIT_BYTES = 32 << 20  # 32 MiB of input per unit: ~8M tokens, one padded row per unit at most
_GLOB_CHARS = "*?["


def _compression(path: str) -> str | None:
    for ext, name in COMPRESSION.items():
        if path.endswith(ext):
            return name
    return None


def _stamp(path: str) -> dict:
    """Size and modification stamp of a file (a changed file gets its units redone on resume)."""
    fs, inner = storage._fs(path)
    info = fs.info(inner)
    stamp = info.get("mtime", info.get("updated", info.get("generation")))
    return {"size": int(info.get("size") or 0), "stamp": str(stamp)}


def _is_hf_dataset_dir(path: str) -> bool:
    return storage.isfile(storage.join(path, "state.json")) and storage.isfile(storage.join(path, "dataset_info.json"))


def expand_source(spec: str) -> tuple[str, list[str]]:
    """(kind, files) of one `--input`: kind "files" (each of a known format, or one plain file),
    "arrow" (a save_to_disk directory's Arrow files, in order) or "hub" ([spec])."""
    if spec.startswith("hf:"):
        _hub_parts(spec)
        return "hub", [spec]
    if any(c in spec for c in _GLOB_CHARS):
        files = [f for f in storage.glob(spec) if storage.isfile(f)]
        if not files:
            raise DataError(f"{spec}: the pattern matches no files")
        unknown = [f for f in files if not f.endswith(KNOWN)]
        if unknown:
            raise DataError(f"{unknown[0]}: not a known input format ({', '.join(KNOWN)})")
        return "files", files
    if storage.isdir(spec):
        if storage.isfile(storage.join(spec, "dataset_dict.json")):
            splits = storage.read_json(storage.join(spec, "dataset_dict.json")).get("splits", [])
            raise DataError(f"{spec}: a Hugging Face DatasetDict; name one split's directory "
                            f"({', '.join(storage.join(spec, s) for s in splits)})")
        if _is_hf_dataset_dir(spec):
            state = storage.read_json(storage.join(spec, "state.json"))
            files = [storage.join(spec, f["filename"]) for f in state.get("_data_files", [])]
            if not files:
                raise DataError(f"{spec}: the dataset has no data files")
            return "arrow", files
        files = [storage.join(spec, n) for n in storage.listdir(spec) if n.endswith(KNOWN)]
        files = [f for f in files if storage.isfile(f)]
        if not files:
            raise DataError(f"{spec}: the directory holds no {', '.join(KNOWN)} files")
        return "files", files
    storage.check_input_file(spec, "input file")
    return "files", [storage.resolve(spec)]


def _hub_parts(spec: str) -> tuple[str, str | None, str]:
    parts = spec[len("hf:"):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{spec}: a hub dataset is hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    return (parts[0], None, parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def plan_units(source: int, spec: str, *, unit_bytes: int = DEFAULT_UNIT_BYTES, text_column: str = "text"
               ) -> list[dict]:
    """The work units of one source, in packing order."""
    kind, files = expand_source(spec)
    units = []
    if kind == "hub":
        try:
            from datasets import load_dataset
        except ImportError:
            raise DataError(f"{spec}: hub datasets need the datasets library: pip install 'normistral-jax[hub]'"
                            ) from None
        name, config, split = _hub_parts(spec)
        try:
            shards = load_dataset(name, config, split=split, streaming=True).num_shards
        except Exception as e:  # offline, no such dataset or split, ...: datasets' many error types
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise DataError(f"{spec}: cannot open the hub dataset ({first.strip()[:200]})") from None
        for i in range(shards):
            units.append({"source": source, "kind": "hub", "file": spec, "start": i, "stop": shards})
    for path in files:
        stamp = _stamp(path)
        if kind == "arrow":
            units.append({"source": source, "kind": "arrow", "file": path, "start": 0, "stop": -1, **stamp})
        elif path.endswith(PARQUET):
            for start, stop in _parquet_ranges(path, unit_bytes, text_column):
                units.append({"source": source, "kind": "parquet", "file": path, "start": start, "stop": stop,
                              **stamp})
        elif path.endswith(".jsonl"):
            size = stamp["size"]
            for start in range(0, max(size, 1), unit_bytes):
                units.append({"source": source, "kind": "jsonl", "file": path, "start": start,
                              "stop": min(start + unit_bytes, size), **stamp})
        else:
            kind_ = "jsonl" if path.endswith(JSONL) else "text"
            units.append({"source": source, "kind": kind_, "file": path, "start": 0, "stop": -1, **stamp})
    return units


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(storage.open(path, "rb"))
    except Exception as e:  # pyarrow raises ArrowInvalid & co. with multi-line details
        raise DataError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None


def _check_string_column(path: str, schema, text_column: str) -> None:
    import pyarrow as pa

    if text_column not in schema.names:
        raise DataError(f"{path}: no column {text_column!r} (columns: {', '.join(schema.names)}); "
                        "choose one with --text-column")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_column!r} holds {kind}, expected strings")


def _parquet_ranges(path: str, unit_bytes: int, text_column: str) -> list[tuple[int, int]]:
    """[start, stop) row-group ranges whose uncompressed size reaches `unit_bytes` (the last may be less)."""
    pf = _parquet_file(path)
    _check_string_column(path, pf.schema_arrow, text_column)
    meta, ranges, start, acc = pf.metadata, [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= unit_bytes:
            ranges.append((start, g + 1))
            start, acc = g + 1, 0
    if start < meta.num_row_groups or not ranges:
        ranges.append((start, meta.num_row_groups))
    return ranges


# -- reading one unit ---------------------------------------------------------------------------------


def unit_documents(unit: dict, text_column: str = "text") -> Iterator[str]:
    """The non-empty documents of one unit, in order."""
    kind, path = unit["kind"], unit["file"]
    try:
        if kind == "jsonl":
            yield from _jsonl(path, unit["start"], unit["stop"])
        elif kind == "text":
            yield from _text(path)
        elif kind == "parquet":
            yield from _parquet(path, unit["start"], unit["stop"], text_column)
        elif kind == "arrow":
            yield from _arrow(path, text_column)
        elif kind == "hub":
            yield from _hub(path, unit["start"], unit["stop"], text_column)
        else:
            raise DataError(f"{path}: unknown unit kind {kind!r}")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError) as e:  # a truncated .gz / .zst, a corrupt stream
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{path}: no such file") from None
        raise DataError(f"{path}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _open_bytes(path: str):
    compression = _compression(path)
    f = storage.open(path, "rb", compression=compression)
    if compression == "zstd":  # zstandard's stream reader has no readline: buffer it
        return io.BufferedReader(f, 1 << 20)
    return f


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (the error path only: reads the prefix)."""
    count, done = 1, 0
    with _open_bytes(path) as f:
        while done < offset:
            chunk = f.read(min(1 << 24, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count


def _jsonl(path: str, start: int, stop: int) -> Iterator[str]:
    """Documents of the lines starting in [start, stop) (stop -1: to the end; then lines are counted)."""
    with _open_bytes(path) as f:
        pos = 0
        if start > 0:
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())  # the line holding byte start-1 belongs to the unit before
        number = 1 if start == 0 else None  # known without counting only for a unit at the file's start
        while stop < 0 or pos < stop:
            line = f.readline()
            if not line:
                break
            line_start, pos = pos, pos + len(line)
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    where = number if number is not None else _line_number(path, line_start)
                    raise DataError(f"{path}:{where}:{json_problem(e).partition(':')[2]}") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    where = number if number is not None else _line_number(path, line_start)
                    raise DataError(f"{path}:{where}: expected a JSON object with a string field 'text'")
                if text.strip():
                    yield text
            if number is not None:
                number += 1


def _text(path: str) -> Iterator[str]:
    with io.TextIOWrapper(_open_bytes(path), encoding="utf-8") as f:
        yield from text_blocks(f)


def _strings(path: str, values: list, first_row: int, text_column: str) -> Iterator[str]:
    for i, text in enumerate(values):
        if not isinstance(text, str):
            raise DataError(f"{path}: row {first_row + i}: column {text_column!r} is {text!r}, expected a string")
        if text.strip():
            yield text


def _parquet(path: str, start: int, stop: int, text_column: str) -> Iterator[str]:
    pf = _parquet_file(path)
    _check_string_column(path, pf.schema_arrow, text_column)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
    for batch in pf.iter_batches(batch_size=1024, row_groups=list(range(start, stop)), columns=[text_column]):
        yield from _strings(path, batch.column(0).to_pylist(), row, text_column)
        row += batch.num_rows


def _arrow(path: str, text_column: str) -> Iterator[str]:
    import pyarrow as pa

    with storage.open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except Exception as e:
            raise DataError(f"{path}: not an Arrow stream ({str(e).splitlines()[0]})") from None
        _check_string_column(path, reader.schema, text_column)
        row = 0
        for batch in reader:
            yield from _strings(path, batch.column(text_column).to_pylist(), row, text_column)
            row += batch.num_rows


def _hub(spec: str, shard: int, shards: int, text_column: str) -> Iterator[str]:
    from datasets import load_dataset

    name, config, split = _hub_parts(spec)
    ds = load_dataset(name, config, split=split, streaming=True).shard(num_shards=shards, index=shard)
    for i, record in enumerate(ds):
        text = record.get(text_column)
        if not isinstance(text, str):
            raise DataError(f"{spec}: shard {shard} row {i}: field {text_column!r} is {text!r}, expected a string")
        if text.strip():
            yield text


def describe(unit: dict) -> str:
    """A short name for a unit in messages."""
    if unit["stop"] < 0:
        return unit["file"]
    return f"{unit['file']}[{unit['start']}:{unit['stop']}]"


def as_key(unit: dict) -> str:
    return json.dumps(unit, sort_keys=True)
