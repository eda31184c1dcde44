"""Input sources for `prepare-data`: what a `--input` names, how it is cut into work units, how a unit's
documents are read. Every path goes through `jaxmodel.storage` (local or gs://, compressed or not).

Inside: `Unit` (a dict: kind, file, range, key), `file_format(path)`, `expand_source(spec)` -> files or a
dataset, `plan_units(source_index, spec, ...)` -> [Unit], `unit_documents(unit, text_column)` -> texts,
`unit_records(unit, fields)` -> tuples of strings (prompt/completion records), `check_records(units, fields)`.

`fields` name what is read of each record: a dict {field name: the flag that chose it}, in order: the text
column (`{"text": "--text-column"}`), or a prompt and a completion field (`{"prompt": "--prompt-field",
"completion": "--completion-field"}`); the flag only words the errors. Plain text skips blank documents;
records are all kept (an empty prompt or completion is data too).

What one `--input` may be (one source, one weight):
- a file, by its extension, letter case ignored (`.JSONL` is `.jsonl`): `.jsonl` (one JSON object per line,
  its string field `--text-column`, default `text`), `.txt` (documents are blocks of lines split by blank
  lines), each optionally compressed (`.gz`, `.zst`, `.bz2`, `.xz`), or `.parquet` (the string column
  `--text-column`). Any other extension is refused with this list: `.json` too (a JSON array and JSON lines
  share it; JSON lines go in a `.jsonl`), and a plain-text file must be named `.txt`;
- a directory (not recursive) or a glob (`data/*.jsonl.zst`, `gs://bkt/hplt/nb/*`): its files in sorted
  order, each of a supported format. In a directory, hidden files (`.*`, `_*`: `.gitattributes`, `_SUCCESS`)
  and documentation (`README*`, `LICENSE*`, `*.md`, unless named as data) are passed over; any other file
  is refused;
- a Hugging Face dataset saved with `save_to_disk` (a directory with `state.json`; for a DatasetDict
  name one split's subdirectory, e.g. `DIR/train`), read from its Arrow files with pyarrow;
- `hf:NAME:SPLIT` or `hf:NAME:CONFIG:SPLIT`: a dataset on the Hugging Face hub, streamed (needs network).

Checked when planning, before any work: a compressed file starts with its codec's signature (a `.zst` that
is gzip, plain text or empty is refused, saying what it is); a `.txt` starts as UTF-8 (and holds no records:
refused when prompt/completion fields are asked for); Parquet and Arrow files have the string columns.
`check_records` reads every record of the units once more (prepare-data calls it for prompt/completion
records before writing anything). While reading, a bad JSON record (one without the field names the
fields it has), a truncated compressed file (its stream ends before the end marker; zstandard's own reader
would end quietly there, so `.zst` is decoded frame by frame: `training.compressed`) and corrupt data are
errors naming the file; a unit that fails keeps nothing (corrupt compressed data that decodes to garbage is
reported as the corruption, not as the garbage).

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

import codecs
import contextlib
import io
import json
import lzma
import sys
import zlib
from collections.abc import Iterator

from jaxmodel import storage
from jaxmodel.checks import json_problem
from training.compressed import CODECS, looks_compressed, open_bytes
from training.documents import DataError, text_blocks

_FORMATS = {".jsonl": "jsonl", ".txt": "text", ".parquet": "parquet"}
SUPPORTED = ".jsonl, .txt (each also .gz, .zst, .bz2, .xz), .parquet; letter case ignored"
_HIDDEN = (".", "_")  # in a directory: hidden files (.gitattributes, _SUCCESS), passed over
_DOCUMENTATION = ("readme", "license")  # (and *.md) passed over too, unless of a supported format
DEFAULT_UNIT_BYTES = 32 << 20  # 32 MiB of input per unit: ~8M tokens, one padded row per unit at most
_GLOB_CHARS = "*?["
_PROBE_BYTES = 1 << 16  # of a .txt, decoded when planning: a binary file fails before any work


def file_format(path: str) -> tuple[str, str | None] | None:
    """(format, codec) of a file by its name, letter case ignored: ("jsonl", "zstd"), ("parquet", None);
    None when the name is not of a supported format."""
    name, codec = path.lower(), None
    for ext, c in CODECS.items():
        if name.endswith(ext):
            name, codec = name[:-len(ext)], c
            break
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext) and not (fmt == "parquet" and codec):
            return fmt, codec
    return None


def _unsupported(path: str) -> DataError:
    hint = "; JSON lines go in a .jsonl file" if path.lower().endswith(".json") else ""
    return DataError(f"{path}: not a supported input format ({SUPPORTED}{hint})")


def _ignored(name: str) -> bool:
    """A directory's file that is not data (hidden, documentation): passed over, not refused."""
    lower = name.lower()
    if lower.startswith(_HIDDEN):
        return True
    return (lower.startswith(_DOCUMENTATION) or lower.endswith(".md")) and file_format(lower) is None


def _stamp(path: str) -> dict:
    """Size and modification stamp of a file (a changed file gets its units redone on resume)."""
    fs, inner = storage.fs_and_path(path)
    info = fs.info(inner)
    stamp = info.get("mtime", info.get("updated", info.get("generation")))
    return {"size": int(info.get("size") or 0), "stamp": str(stamp)}


def _is_hf_dataset_dir(path: str) -> bool:
    return storage.isfile(storage.join(path, "state.json")) and storage.isfile(storage.join(path, "dataset_info.json"))


def expand_source(spec: str) -> tuple[str, list[str]]:
    """(kind, files) of one `--input`: kind "files" (each of a supported format), "arrow" (a save_to_disk
    directory's Arrow files, in order) or "hub" ([spec])."""
    if spec.startswith("hf:"):
        _hub_parts(spec)
        return "hub", [spec]
    if any(c in spec for c in _GLOB_CHARS):
        files = [f for f in storage.glob(spec) if storage.isfile(f)]
        if not files:
            raise DataError(f"{spec}: the pattern matches no files")
        return "files", _supported(files)
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
        files = [storage.join(spec, n) for n in storage.listdir(spec) if not _ignored(n)]
        files = _supported([f for f in files if storage.isfile(f)])
        if not files:
            raise DataError(f"{spec}: the directory holds no input files ({SUPPORTED})")
        return "files", files
    storage.check_input_file(spec, "input file")
    return "files", _supported([storage.resolve(spec)])


def _supported(files: list[str]) -> list[str]:
    """The files, each of a supported format, or the error naming the first that is not."""
    for f in files:
        if file_format(f) is None:
            raise _unsupported(f)
    return files


def _hub_parts(spec: str) -> tuple[str, str | None, str]:
    parts = spec[len("hf:"):].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{spec}: a hub dataset is hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    return (parts[0], None, parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def text_fields(text_column: str = "text") -> dict[str, str]:
    """The `fields` of plain text: its one text column."""
    return {text_column: "--text-column"}


def _as_fields(fields: dict[str, str] | str) -> dict[str, str]:
    return text_fields(fields) if isinstance(fields, str) else fields


def plan_units(source: int, spec: str, *, unit_bytes: int = DEFAULT_UNIT_BYTES,
               fields: dict[str, str] | str = "text") -> list[dict]:
    """The work units of one source, in packing order (each file probed first: see the module docstring).
    `fields`: what is read of each record (a text column's name stands for `text_fields(name)`)."""
    kind, files = expand_source(spec)
    if kind == "hub":
        return _hub_units(source, spec)
    fields = _as_fields(fields)
    per_file = storage.map_threads(lambda path: _file_units(source, kind, path, unit_bytes, fields), files)
    return [unit for units in per_file for unit in units]


def check_records(units: list[dict], fields: dict[str, str]) -> None:
    """Reads every record of `units` (hub shards excepted: streamed, read once) and raises the first bad
    one's error, in unit order; run before any output exists."""
    def count(unit):
        return sum(1 for _ in unit_records(unit, fields))

    storage.map_threads(count, [u for u in units if u["kind"] != "hub"])


def _hub_units(source: int, spec: str) -> list[dict]:
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
    return [{"source": source, "kind": "hub", "file": spec, "start": i, "stop": shards} for i in range(shards)]


def _file_units(source: int, kind: str, path: str, unit_bytes: int, fields: dict[str, str]) -> list[dict]:
    """The units of one file, after its probe."""
    base = {"source": source, "kind": kind, "file": path, **_stamp(path)}
    if kind == "arrow":
        with _reading(path), storage.open(path, "rb") as f:
            _arrow_reader(path, f, fields)
        return [{**base, "start": 0, "stop": -1}]
    fmt, codec = file_format(path)
    if fmt == "parquet":
        return [{**base, "kind": "parquet", "start": start, "stop": stop}
                for start, stop in _parquet_ranges(path, unit_bytes, fields)]
    if fmt == "text" and len(fields) > 1:
        raise DataError(f"{path}: a .txt file holds plain text, not {'/'.join(fields)} records (give those as "
                        ".jsonl or .parquet)")
    with _reading(path):
        _probe(path, fmt)
    if fmt == "jsonl" and codec is None:
        size = base["size"]
        return [{**base, "kind": "jsonl", "start": start, "stop": min(start + unit_bytes, size)}
                for start in range(0, max(size, 1), unit_bytes)]
    return [{**base, "kind": fmt, "start": 0, "stop": -1}]


def _probe(path: str, fmt: str) -> None:
    """Opens the file (a compressed one's signature is checked); of text, decodes the first bytes as UTF-8.
    (JSON records are checked as they are read: a bad one keeps the units committed before it.)"""
    with _open_bytes(path) as f:
        if fmt == "text":
            codecs.getincrementaldecoder("utf-8")().decode(f.read(_PROBE_BYTES), final=False)


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(storage.open(path, "rb"))
    except Exception as e:  # pyarrow raises ArrowInvalid & co. with multi-line details
        raise DataError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None


def _check_string_columns(path: str, schema, fields: dict[str, str]) -> None:
    import pyarrow as pa

    for column, flag in fields.items():
        if column not in schema.names:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); "
                            f"choose one with {flag}")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {column!r} holds {kind}, expected strings")


def _parquet_ranges(path: str, unit_bytes: int, fields: dict[str, str]) -> list[tuple[int, int]]:
    """[start, stop) row-group ranges whose uncompressed size reaches `unit_bytes` (the last may be less)."""
    pf = _parquet_file(path)
    _check_string_columns(path, pf.schema_arrow, fields)
    meta, ranges, start, acc = pf.metadata, [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= unit_bytes:
            ranges.append((start, g + 1))
            start, acc = g + 1, 0
    if start < meta.num_row_groups or not ranges:
        ranges.append((start, meta.num_row_groups))
    return ranges


# -- reading ------------------------------------------------------------------------------------------


def unit_documents(unit: dict, text_column: str = "text") -> Iterator[str]:
    """The non-empty documents of one unit, in order."""
    for (text,) in unit_records(unit, text_fields(text_column)):
        if text.strip():
            yield text


def unit_records(unit: dict, fields: dict[str, str]) -> Iterator[tuple[str, ...]]:
    """Every record of one unit, in order: the strings of `fields`, in their order (a `.txt` unit: its
    documents, as 1-tuples)."""
    kind, path = unit["kind"], unit["file"]
    with _reading(path):
        if kind == "jsonl":
            yield from _jsonl(path, unit["start"], unit["stop"], fields)
        elif kind == "text":
            yield from ((block,) for block in _text(path))
        elif kind == "parquet":
            yield from _parquet(path, unit["start"], unit["stop"], fields)
        elif kind == "arrow":
            yield from _arrow(path, fields)
        elif kind == "hub":
            yield from _hub(path, unit["start"], unit["stop"], fields)
        else:
            raise DataError(f"{path}: unknown unit kind {kind!r}")


@contextlib.contextmanager
def _reading(path: str, *, verify: bool = True):
    """Turns what reading a file can raise (a cut or corrupt stream, bytes that are not UTF-8) into one line
    naming the file and the cause; `verify`: a bad record of a compressed file first checks its stream."""
    fmt = file_format(path)
    codec = fmt[1] if fmt else None
    try:
        yield
    except (DataError, UnicodeDecodeError) as e:
        # corrupt compressed data may decode to garbage before its checksum fails: report the cause
        cause = _stream_error(path) if codec and verify else None
        if cause is not None:
            raise cause from None
        if isinstance(e, UnicodeDecodeError):
            raise DataError(f"{path}: not UTF-8 text ({e.reason}){looks_compressed(path)}") from None
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except EOFError:  # gzip, bz2, xz and zstd (training.compressed): the input ended inside a compressed stream
        raise DataError(f"{path}: cannot be read: truncated (the {codec} stream ends before its end marker)"
                        ) from None
    except (OSError, zlib.error, lzma.LZMAError, *_arrow_errors()) as e:
        what = f"corrupt {codec} data" if codec else "corrupt data"
        raise DataError(f"{path}: cannot be read: {what} ({_first_line(e)})") from None


def _stream_error(path: str) -> DataError | None:
    """The error of decompressing the whole file, if any (the error path only: it reads the file)."""
    try:
        with _reading(path, verify=False), _open_bytes(path) as f:
            while f.read(1 << 24):
                pass
    except DataError as e:
        return e
    return None


def _arrow_errors() -> tuple:
    """pyarrow's error type once pyarrow is loaded (a JSON-lines job never imports it)."""
    arrow = sys.modules.get("pyarrow")
    return (arrow.ArrowException,) if arrow is not None else ()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _open_bytes(path: str):
    """The file's bytes, decompressed by the codec its name gives (`training.compressed.open_bytes`)."""
    return open_bytes(path, file_format(path)[1])


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


class _BadRecord(ValueError):
    """What is wrong with one JSON line; the caller adds `FILE:LINE`."""


def _record_fields(line: bytes, fields: dict[str, str]) -> tuple[str, ...]:
    """The string fields `fields` of one JSON line, or _BadRecord naming the first missing or not a string."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadRecord(json_problem(e).partition(":")[2].strip()) from None
    values = []
    for name, flag in fields.items():
        value = record.get(name) if isinstance(record, dict) else None
        if not isinstance(value, str):
            problem = f"expected a JSON object with a string field {name!r}"
            if isinstance(record, dict) and name not in record:  # the wrong field name, most likely
                problem += f"; its fields: {', '.join(map(str, record)) or 'none'} (choose one with {flag})"
            elif isinstance(record, dict):
                problem += f"; it is {_short(value)}"
            raise _BadRecord(problem)
        values.append(value)
    return tuple(values)


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _jsonl(path: str, start: int, stop: int, fields: dict[str, str]) -> Iterator[tuple[str, ...]]:
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
                    record = _record_fields(line, fields)
                except _BadRecord as e:
                    where = number if number is not None else _line_number(path, line_start)
                    raise DataError(f"{path}:{where}: {e}") from None
                yield record
            if number is not None:
                number += 1


def _text(path: str) -> Iterator[str]:
    with _open_bytes(path) as f:
        yield from text_blocks(io.TextIOWrapper(f, encoding="utf-8"))


def _rows(path: str, batch, first_row: int, fields: dict[str, str]) -> Iterator[tuple[str, ...]]:
    """The records of one Arrow record batch (null values are errors naming the row and the column)."""
    columns = [batch.column(name).to_pylist() for name in fields]
    for i, record in enumerate(zip(*columns)):
        for name, value in zip(fields, record):
            if not isinstance(value, str):
                raise DataError(f"{path}: row {first_row + i}: column {name!r} is {value!r}, expected a string")
        yield record


def _parquet(path: str, start: int, stop: int, fields: dict[str, str]) -> Iterator[tuple[str, ...]]:
    pf = _parquet_file(path)
    _check_string_columns(path, pf.schema_arrow, fields)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
    for batch in pf.iter_batches(batch_size=1024, row_groups=list(range(start, stop)), columns=list(fields)):
        yield from _rows(path, batch, row, fields)
        row += batch.num_rows


def _arrow_reader(path: str, f, fields: dict[str, str]):
    """The record batch reader of an Arrow stream file, its columns checked."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(f)
    except Exception as e:
        raise DataError(f"{path}: not an Arrow stream ({_first_line(e)})") from None
    _check_string_columns(path, reader.schema, fields)
    return reader


def _arrow(path: str, fields: dict[str, str]) -> Iterator[tuple[str, ...]]:
    with storage.open(path, "rb") as f:
        row = 0
        for batch in _arrow_reader(path, f, fields):
            yield from _rows(path, batch, row, fields)
            row += batch.num_rows


def _hub(spec: str, shard: int, shards: int, fields: dict[str, str]) -> Iterator[tuple[str, ...]]:
    from datasets import load_dataset

    name, config, split = _hub_parts(spec)
    ds = load_dataset(name, config, split=split, streaming=True).shard(num_shards=shards, index=shard)
    for i, record in enumerate(ds):
        values = tuple(record.get(field) for field in fields)
        for field, value in zip(fields, values):
            if not isinstance(value, str):
                raise DataError(f"{spec}: shard {shard} row {i}: field {field!r} is {value!r}, expected a string")
        yield values


def describe(unit: dict) -> str:
    """A short name for a unit in messages."""
    if unit["stop"] < 0:
        return unit["file"]
    return f"{unit['file']}[{unit['start']}:{unit['stop']}]"


def as_key(unit: dict) -> str:
    return json.dumps(unit, sort_keys=True)
