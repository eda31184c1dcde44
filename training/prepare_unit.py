"""One work unit of `prepare-data`: the tokenizer, and a unit's documents -> packed rows -> shards + marker.

Inside: `load_tokenizer(dir)` (the driver's: what workers need of a tokenizer, as plain data),
`run_unit(job, i, work_dir)` (the same code on every engine: in-process, a local worker, a Ray task), the
shard writer and the packer. `training.prepare` plans the job, schedules the units and commits the output.

Invariants: `run_unit` is a pure function of its arguments (the job is plain data, the tokenizer is rebuilt
from its JSON once per process), so a unit's files are the same whichever process writes them; every file
appears only complete (`storage.atomic_write`) and the unit's marker is written last: a unit counts as done
only once its marker exists.

Packing (within one unit, in document order; rows never mix units, hence never sources):
- A document is its tokens with `<s>` (the tokenizer's post-processor; prepended here if a tokenizer lacks
  one) and `</s>` appended here. Text that spells a special token ("</s>") is encoded as text: a document
  cannot forge document boundaries.
- Documents are packed greedily into rows of seq_len tokens: a document that fits the open row joins it;
  one that does not closes the row (the rest is padding: pad id, segment 0, position 0).
- A document longer than seq_len is cut into seq_len-token chunks that fill rows of their own; its last
  partial chunk opens a new row that later documents may join. Positions restart at 0 in every chunk.
- A unit's last row is closed (padded) at the unit's end rather than continued by the next unit: that is
  what makes units independent. It costs at most one padded row per unit (32 MiB units of text are ~8M
  tokens: under 0.5% padding at 32K-token rows, negligible at 4K).
- `segment_ids` count 1, 2, 3, ... per document (or chunk) within a row; 0 only for padding.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np

from jaxmodel import storage
from training import sources as src
from training.data import ARRAYS, MASK
from training.documents import DataError

_TOKENIZE_BATCH = 256
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


# ---------------------------------------------------------------------------------------------------
# The tokenizer


def load_tokenizer(tokenizer_dir: str) -> dict:
    """What workers need of a Hugging Face tokenizer directory (local or gs://): its fast tokenizer as a
    JSON string, the special ids, the vocabulary size and a fingerprint. One-line errors.

    With a tokenizer.json (every fast tokenizer), it and tokenizer_config.json / special_tokens_map.json
    are read directly with `tokenizers` (transformers would import torch: seconds per run); without one
    (a sentencepiece-only directory), transformers converts it."""
    shown = os.fspath(tokenizer_dir)
    if not storage.isdir(tokenizer_dir):
        if storage.exists(tokenizer_dir):
            raise DataError(f"{shown}: is a file, expected a tokenizer directory")
        raise FileNotFoundError(f"{shown}: no such tokenizer directory")
    names = storage.listdir(tokenizer_dir)
    if not any(n in names for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise DataError(f"{shown}: not a tokenizer directory (no tokenizer.json or tokenizer_config.json)")
    configs = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        if name in names:
            try:
                configs[name] = json.loads(storage.read_text(storage.join(tokenizer_dir, name)))
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{storage.join(tokenizer_dir, name)}: not valid JSON ({str(e).splitlines()[0]})"
                                ) from None
    if "tokenizer.json" in names:
        from tokenizers import Tokenizer

        path = storage.join(tokenizer_dir, "tokenizer.json")
        try:
            tok = Tokenizer.from_str(storage.read_text(path))
        except Exception as e:  # tokenizers raises its own Exception type with the serde message
            raise DataError(f"{path}: cannot load the tokenizer ({str(e).splitlines()[0][:200]})") from None
        backend = tok.to_str()

        def special(role):
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                value = (configs.get(name) or {}).get(role)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    return tok.token_to_id(value)
            return None

        bos, eos, pad, vocab = special("bos_token"), special("eos_token"), special("pad_token"), \
            tok.get_vocab_size(with_added_tokens=True)
    else:
        import transformers
        from transformers import AutoTokenizer

        transformers.logging.set_verbosity_error()
        with storage.local_copy(tokenizer_dir, names=_TOKENIZER_FILES) as local:
            try:
                hf = AutoTokenizer.from_pretrained(local)
                backend = hf.backend_tokenizer.to_str()
            except Exception as e:  # a garbage vocabulary file: many libraries, many exception types
                first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                raise DataError(f"{shown}: cannot load the tokenizer ({first.strip()[:200]})") from None
        bos, eos, pad, vocab = hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)
    if eos is None:
        raise DataError(f"{shown}: the tokenizer has no eos_token; documents could not be delimited")
    info = {"json": backend, "bos_id": bos, "eos_id": eos, "pad_id": pad if pad is not None else eos,
            "vocab_size": vocab, "name": storage.basename(tokenizer_dir), "path": storage.resolve(tokenizer_dir)}
    info["sha256"] = hashlib.sha256(json.dumps([backend, info["bos_id"], info["eos_id"], info["pad_id"]]).encode()
                                    ).hexdigest()
    return info


_ENCODERS: dict[str, object] = {}


def _encoder(job: dict):
    """The job's Rust tokenizer, built once per process (special tokens in the text encoded as text)."""
    key = job["tokenizer"]["sha256"]
    if key not in _ENCODERS:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(job["tokenizer"]["json"])
        tok.encode_special_tokens = True  # what transformers' split_special_tokens=True sets
        _ENCODERS[key] = tok
    return _ENCODERS[key]


def record_fields(instruction: dict) -> dict[str, str]:
    """The record fields to read (training.sources), prompt first."""
    return {instruction["prompt_field"]: "--prompt-field", instruction["completion_field"]: "--completion-field"}


def unit_name(i: int) -> str:
    return f"unit-{i:06d}"


# ---------------------------------------------------------------------------------------------------
# One unit


class _Shards:
    """Rows of one unit, written as shards of at most `rows_per_shard` rows (buffers grow as rows come, so a
    small unit costs little memory)."""

    def __init__(self, work_dir: str, name: str, seq_len: int, rows_per_shard: int, pad_id: int, *,
                 masked: bool = False):
        self.work_dir, self.name, self.seq_len, self.rows_per_shard = work_dir, name, seq_len, rows_per_shard
        self.pad_id, self.masked = pad_id, masked
        self.shards: list[dict] = []
        self._new_buffer(min(64, rows_per_shard))

    def _new_buffer(self, rows: int) -> None:
        self.tokens = np.full((rows, self.seq_len), self.pad_id, np.int32)
        self.segments = np.zeros((rows, self.seq_len), np.int32)
        self.mask = np.zeros((rows, self.seq_len), np.uint8) if self.masked else None
        self.used = 0

    def open_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(tokens, segments, mask or None) views of the next row (pad and 0 until written); `commit_row`
        keeps it."""
        if self.used == len(self.tokens):  # grow (doubling, up to a shard)
            old_t, old_s, old_m = self.tokens, self.segments, self.mask
            self._new_buffer(min(2 * len(old_t), self.rows_per_shard))
            self.tokens[:len(old_t)], self.segments[:len(old_s)] = old_t, old_s
            if self.masked:
                self.mask[:len(old_m)] = old_m
            self.used = len(old_t)
        return self.tokens[self.used], self.segments[self.used], None if self.mask is None else self.mask[self.used]

    def commit_row(self) -> None:
        self.used += 1
        if self.used == self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.used:
            return
        tokens, segments = self.tokens[:self.used], self.segments[:self.used]
        # positions restart at 0 at each segment change (padding, segment 0, gets 0 too)
        flat = segments.reshape(-1)
        change = np.r_[True, flat[1:] != flat[:-1]]
        change[::self.seq_len] = True  # every row starts afresh
        idx = np.arange(flat.size)
        positions = (idx - np.maximum.accumulate(np.where(change, idx, 0))).reshape(segments.shape)
        positions = np.where(segments == 0, 0, positions).astype(np.int32)
        entry = {"rows": self.used}
        arrays = list(zip(ARRAYS, (tokens, segments, positions)))
        if self.masked:
            arrays.append((MASK, self.mask[:self.used]))
        for arr_name, arr in arrays:
            entry[arr_name] = f"{self.name}-{len(self.shards):03d}.{arr_name}.npy"
            _write_npy(storage.join(self.work_dir, entry[arr_name]), np.ascontiguousarray(arr))
        self.shards.append(entry)
        self._new_buffer(min(64, self.rows_per_shard))


def _write_npy(path: str, arr: np.ndarray) -> None:
    """An .npy file that appears only complete."""
    with storage.atomic_write(path, "wb") as f:
        np.save(f, arr)


def write_json_atomic(path: str, value) -> None:
    with storage.atomic_write(path) as f:
        f.write(json.dumps(value, indent=1, ensure_ascii=False))


class _Packer:
    """Greedy packing of one unit's documents into rows (see the module docstring), written straight into
    the shard buffers (numpy slices: no per-token Python work)."""

    def __init__(self, out: _Shards):
        self.out, self.seq_len = out, out.seq_len
        self.row: tuple[np.ndarray, np.ndarray] | None = None
        self.fill = 0
        self.segment = 0

    def add(self, doc: np.ndarray, mask: np.ndarray | None = None) -> None:
        """One document's tokens (and, for masked shards, its per-token mask, cut and placed alike)."""
        t = self.seq_len
        if len(doc) > t:
            self.close_row()
            full = len(doc) - len(doc) % t
            for start in range(0, full, t):
                tokens, segments, row_mask = self.out.open_row()
                tokens[:] = doc[start:start + t]
                segments[:] = 1
                if row_mask is not None:
                    row_mask[:] = mask[start:start + t]
                self.out.commit_row()
            doc = doc[full:]
            mask = None if mask is None else mask[full:]
            if not len(doc):
                return
        if self.fill + len(doc) > t:
            self.close_row()
        if self.row is None:
            self.row, self.fill, self.segment = self.out.open_row(), 0, 0
        self.segment += 1
        tokens, segments, row_mask = self.row
        tokens[self.fill:self.fill + len(doc)] = doc
        segments[self.fill:self.fill + len(doc)] = self.segment
        if row_mask is not None:
            row_mask[self.fill:self.fill + len(doc)] = mask
        self.fill += len(doc)

    def close_row(self) -> None:
        if self.row is not None:
            self.out.commit_row()
            self.row, self.fill = None, 0


def _encode_texts(tok, texts: list[str], bos: int | None, eos: int) -> list[tuple[list[int], None]]:
    """Plain documents: (`<s>` + tokens + `</s>`, no mask) each."""
    docs = []
    for enc in tok.encode_batch_fast(texts, add_special_tokens=True):
        ids = enc.ids
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        ids.append(eos)
        docs.append((ids, None))
    return docs


def _encode_records(tok, records: list[tuple[str, str]], template: str | None, bos: int | None, eos: int
                    ) -> list[tuple[list[int], list[int]]]:
    """Prompt/completion records: (`<s>` + tokens of template(prompt) + completion + `</s>`, per-token mask:
    1 for the tokens ending inside the completion and the `</s>`) each; see training.prepare's docstring."""
    prompts = [prompt if template is None else template.format(prompt) for prompt, _ in records]
    # encode_batch, not encode_batch_fast: the character offsets place the prompt/completion boundary.
    encs = tok.encode_batch([p + c for p, (_, c) in zip(prompts, records)], add_special_tokens=True)
    docs = []
    for prompt, enc in zip(prompts, encs):
        boundary = len(prompt)
        ids = enc.ids
        mask = [int(end > boundary and not special) for (_, end), special in zip(enc.offsets, enc.special_tokens_mask)]
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
            mask.insert(0, 0)
        ids.append(eos)
        mask.append(1)
        docs.append((ids, mask))
    return docs


class _UnitCounts:
    """What a unit's marker counts: documents, tokens, trained tokens (masked data), the largest id."""

    def __init__(self):
        self.documents = self.tokens = self.trained = 0
        self.max_id = -1


def _pack(packer: _Packer, docs: list[tuple[list[int], list[int] | None]], counts: _UnitCounts) -> None:
    """Packs encoded documents in order (one numpy array for the batch: no per-token Python work)."""
    lengths = [len(ids) for ids, _ in docs]
    flat = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in docs), np.int64, sum(lengths))
    masks = None
    if docs and docs[0][1] is not None:
        masks = np.fromiter(itertools.chain.from_iterable(m for _, m in docs), np.uint8, sum(lengths))
        counts.trained += int(masks.sum(dtype=np.int64))
    counts.max_id = max(counts.max_id, int(flat.max()))
    start = 0
    for n in lengths:
        packer.add(flat[start:start + n], None if masks is None else masks[start:start + n])
        start += n
    counts.tokens += start
    counts.documents += len(docs)


def run_unit(job: dict, i: int, work_dir: str) -> dict:
    """Tokenize and pack unit `i` of `job` into `work_dir`; write its marker last; return the marker."""
    unit, settings, tokenizer = job["units"][i], job["settings"], job["tokenizer"]
    tok = _encoder(job)
    bos, eos = tokenizer["bos_id"], tokenizer["eos_id"]
    instruction = settings.get("instruction")
    out = _Shards(work_dir, unit_name(i), settings["seq_len"], settings["rows_per_shard"], tokenizer["pad_id"],
                  masked=instruction is not None)
    packer, counts = _Packer(out), _UnitCounts()
    if instruction is None:
        items = src.unit_documents(unit, settings["text_column"])

        def encode(batch):
            return _encode_texts(tok, batch, bos, eos)
    else:
        items = src.unit_records(unit, record_fields(instruction))

        def encode(batch):
            return _encode_records(tok, batch, instruction["template"], bos, eos)

    for batch in _batched(items):
        _pack(packer, encode(batch), counts)
    packer.close_row()
    out.flush()
    marker = {"key": src.as_key(unit), "shards": out.shards, "documents": counts.documents, "tokens": counts.tokens,
              "max_token_id": counts.max_id}
    if instruction is not None:
        marker["trained_tokens"] = counts.trained
    write_json_atomic(storage.join(work_dir, unit_name(i) + ".json"), marker)
    return marker


def _batched(items):
    """Lists of `_TOKENIZE_BATCH` items (itertools.batched needs Python 3.12)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == _TOKENIZE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
