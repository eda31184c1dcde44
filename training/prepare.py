"""`prepare-data`: tokenize and pack text into the shards `training.data.PackedDataset` reads, in parallel
and resumably.

Inside: `prepare_data(...)` (the API and the CLI's entry), `plan(...)` (a `Job`: settings + units),
`pending_units`, the local worker pool (`run_local`), `start` / `finalize` (the output's commit protocol).
What runs for one unit (the tokenizer, the packer, `run_unit`) is in `training.prepare_unit`.

How a run goes:
1. Plan: each `--input` is one source; `training.sources` expands it and cuts it into work units (files,
   line-aligned byte ranges of `.jsonl`, runs of Parquet row groups). The job's settings (tokenizer
   fingerprint, seq_len, shard size, unit size, text column or record fields and template) and the unit list
   are fixed here.
2. Work: each unit is tokenized and packed by itself into `unit-UUUUUU-SSS.{tokens,segment_ids,positions}.npy`
   (and `.loss_mask.npy` for prompt/completion records; one or more shards), then its marker
   `unit-UUUUUU.json` is written (rows, documents, tokens). A unit counts as done only with a marker whose key
   matches the plan; its files are written under temporary names and renamed (local) or uploaded whole (gs://,
   an object appears only when complete), so a kill at any point leaves either a complete unit or nothing that
   counts. Workers: `workers` processes on this machine (`multiprocessing`, spawn), or a Ray cluster
   (`training.prepare_ray`).
3. Finish: the index lists the units' shards in unit order (the source row ranges follow), then
   index.json is written last. Locally the work happens in a hidden sibling `.NAME.partial` renamed to
   NAME at the end (NAME appears only complete, as before); on gs:// in NAME itself between the storage
   layer's `_WRITING` and `_COMMITTED` markers. Markers and job.json are removed once index.json exists.
Rerunning the same command after a kill or an error skips the units with a marker and does the rest; the
output is byte-identical to an uninterrupted single-process run, whatever the number of workers. What a
rerun could not use goes: a failed or interrupted run with no unit committed, or a refusal of the whole job
("no documents"), leaves nothing (`.NAME.partial` and any directories created above the output included).

Prompt/completion records (`instruction=`: the CLI's `--prompt-field`, `--completion-field`, `--template`):
- Each record is one document: `<s>` + template.format(prompt) + completion + `</s>` (the template as
  `generate --template` takes it: `{0}` is the prompt, `{{`/`}}` literal braces; no template: the prompt as
  is; no separator is added: a completion that should follow a space starts with one). That text is
  tokenized as one string, exactly as plain text would be, so the model trains on the tokens the text has;
  a token is a completion token when its character span ends inside the completion (a token spanning the
  boundary counts as completion). Tokenizing prompt and completion apart would differ here: the
  tokenizer's normalizer prepends a space to every text it encodes.
- A uint8 mask next to the tokens (training.data.MASK) is 1 on the completion tokens and the `</s>` after
  them, 0 on `<s>`, the prompt and padding; it is packed (and cut into chunks) with the tokens. Records
  are all kept, an empty prompt or completion included (an empty completion still teaches `</s>`).
- Every record is read once before any output exists (sources.check_records): a missing or non-string
  field is one line naming the file, the line or row, and the field, with nothing written.
- The index is format 2 (training.data.MASKED_FORMAT) with the settings under `instruction` and each
  source's `trained_tokens`; plain text stays format 1, byte-identical to what it was.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable

import numpy as np

from jaxmodel import storage
from jaxmodel.checks import TemplateError, check_template
from training import sources as src
from training.data import ARRAYS, DEFAULT_SHARD_TOKENS, FORMAT, MASK, MASKED_FORMAT
from training.documents import DataError
from training.prepare_unit import load_tokenizer, record_fields, run_unit, unit_name, write_json_atomic

JOB = "job.json"
INDEX = "index.json"


# ---------------------------------------------------------------------------------------------------
# The plan


def plan(tokenizer: dict, inputs: list[str], seq_len: int, *, shard_tokens: int = DEFAULT_SHARD_TOKENS,
         unit_bytes: int = src.DEFAULT_UNIT_BYTES, text_column: str = "text", instruction: dict | None = None
         ) -> dict:
    """The job: settings that shape the output, and its units in packing order. `instruction` (from
    `instruction_settings`): prompt/completion records, every one of them read here first."""
    fields = src.text_fields(text_column) if instruction is None else record_fields(instruction)
    units = []
    for s, spec in enumerate(inputs):
        units += src.plan_units(s, spec, unit_bytes=unit_bytes, fields=fields)
    if instruction is not None:
        src.check_records(units, fields)  # a bad record is refused before any output exists
    settings = {"format": FORMAT, "seq_len": int(seq_len), "rows_per_shard": max(1, int(shard_tokens) // int(seq_len)),
                "unit_bytes": int(unit_bytes), "text_column": text_column, "tokenizer": tokenizer["sha256"],
                "inputs": [storage.resolve(i) if not i.startswith("hf:") else i for i in inputs]}
    if instruction is not None:  # (plain text keeps exactly its old settings: an old partial run resumes)
        settings.update(format=MASKED_FORMAT, text_column=None, instruction=instruction)
    return {"settings": settings, "tokenizer": tokenizer, "inputs": list(inputs), "units": units}


def instruction_settings(prompt_field: str | None, completion_field: str | None, template: str | None
                         ) -> dict | None:
    """The `instruction` settings of `prepare_data` from its arguments (None: plain text, when all are None);
    a missing field name defaults to "prompt" / "completion". One-line errors."""
    if prompt_field is None and completion_field is None and template is None:
        return None
    prompt_field = "prompt" if prompt_field is None else prompt_field
    completion_field = "completion" if completion_field is None else completion_field
    for flag, name in (("--prompt-field", prompt_field), ("--completion-field", completion_field)):
        if not isinstance(name, str) or not name:
            raise DataError(f"{flag} must be a field name, got {name!r}")
    if prompt_field == completion_field:
        raise DataError(f"--prompt-field and --completion-field are both {prompt_field!r}; name two fields")
    if template is not None:
        try:
            check_template(template, "--template")
        except TemplateError as e:
            raise DataError(str(e)) from None
    return {"prompt_field": prompt_field, "completion_field": completion_field, "template": template}



def _check_args(inputs, weights, seq_len, shard_tokens, unit_bytes, workers):
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2 (an input and its target), got {seq_len!r}")
    if not inputs:
        raise DataError("no input files")
    if len(set(inputs)) != len(inputs):
        raise DataError("an input file is given twice; list each source once")
    if weights is not None:
        if len(weights) != len(inputs):
            raise DataError(f"{len(weights)} weights for {len(inputs)} inputs; give one weight per input")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    if shard_tokens < seq_len:
        raise DataError(f"shard_tokens {shard_tokens} is below seq_len {seq_len}")
    if unit_bytes < 1:
        raise DataError(f"the unit size must be positive, got {unit_bytes} bytes")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")


# ---------------------------------------------------------------------------------------------------
# Committed units


def _read_marker(job: dict, work_dir: str, i: int) -> dict | None:
    path = storage.join(work_dir, unit_name(i) + ".json")
    if not storage.exists(path):
        return None
    try:
        marker = storage.read_json(path)
    except (ValueError, OSError):
        return None
    return marker if marker.get("key") == src.as_key(job["units"][i]) else None


def pending_units(job: dict, work_dir: str) -> tuple[list[int], dict[int, dict]]:
    """(units still to do, markers of the committed ones)."""
    names = set(storage.listdir(work_dir))
    found = [i for i in range(len(job["units"])) if unit_name(i) + ".json" in names]
    markers = storage.map_threads(lambda i: _read_marker(job, work_dir, i), found)
    done = {i: m for i, m in zip(found, markers) if m is not None}
    return [i for i in range(len(job["units"])) if i not in done], done


# ---------------------------------------------------------------------------------------------------
# Workers on this machine


_WORKER_JOB: dict = {}


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init(job: dict) -> None:
    for sig in _STOP_SIGNALS:  # the parent handles Ctrl-C and SIGTERM (sent to the group too) and ends the pool
        signal.signal(sig, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: parallelism is the processes
    with contextlib.suppress(Exception):  # die with the parent (kill -9 included); Linux only
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    _WORKER_JOB.clear()
    _WORKER_JOB.update(job)


def _worker_run(args):
    i, work_dir = args
    return i, run_unit(_WORKER_JOB, i, work_dir)


def run_local(job: dict, todo: list[int], work_dir: str, workers: int, on_done: Callable[[int, dict], None]) -> None:
    """Runs the units `todo` on `workers` processes of this machine (in this process when 1)."""
    if workers <= 1 or len(todo) <= 1:
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            for i in todo:
                on_done(i, run_unit(job, i, work_dir))
        finally:
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: the caller may be a JAX process (threads), and fork after threads can deadlock.
    # A process pool that notices a dead worker (OOM-killed): multiprocessing.Pool would wait forever.
    pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(job,))
    try:
        # Workers start with SIGINT and SIGTERM blocked (a signal mask survives exec): a Ctrl-C while they
        # import must not print their tracebacks, nor a SIGTERM kill them first (the parent would report a
        # dead worker, not the interruption); this process handles both and ends them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pending = {pool.submit(_worker_run, (i, work_dir)) for i in todo}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    i, marker = future.result()
                except BrokenProcessPool:
                    raise DataError("a worker process died (killed, or out of memory: try fewer --workers); "
                                    "rerun the same command to resume") from None
                on_done(i, marker)
        pool.shutdown(wait=True)
    finally:  # after an error or Ctrl-C (a no-op after the clean shutdown above)
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # running units are abandoned (their temporaries are removed by the caller)
            with contextlib.suppress(Exception):
                p.kill()
        for p in processes:
            with contextlib.suppress(Exception):
                p.join(10)


# ---------------------------------------------------------------------------------------------------
# The whole job


def _work_dir(output: str) -> str:
    """Where the units are written: a hidden sibling locally (renamed at the end), the output on gs://."""
    if storage.is_remote(output):
        return output
    return os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.partial")


def _remove_temporaries(work_dir: str) -> None:
    if storage.is_remote(work_dir):
        return  # uploads are atomic: an interrupted one leaves nothing
    with contextlib.suppress(OSError):
        for name in os.listdir(work_dir):
            if ".tmp-" in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(work_dir, name))


def start(job: dict, output: str) -> str:
    """Checks the output and opens (or reopens, for the same job) its work directory; returns it."""
    output = storage.resolve(output)
    work = _work_dir(output)
    if storage.is_remote(output):
        b = storage.bucket(output)
        if not storage.exists(b):
            raise storage.StorageError(f"{output}: bucket {b} does not exist")
        names = storage.listdir(output)
        if storage.COMMITTED in names or INDEX in names and storage.WRITING not in names:
            raise FileExistsError(f"{output}: already prepared (has {INDEX}); choose a new output")
        if names and (storage.WRITING not in names or JOB not in names):
            raise FileExistsError(f"{output}: exists and is not an empty directory")
    else:
        if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
            raise FileExistsError(f"{output}: exists and is not an empty directory")
        storage.makedirs(os.path.dirname(output))
        if not os.access(os.path.dirname(output), os.W_OK | os.X_OK):
            raise storage.StorageError(f"{output}: parent directory {os.path.dirname(output)} is not writable")
    job_path = storage.join(work, JOB)
    if storage.exists(job_path):
        try:
            previous = storage.read_json(job_path)
        except (ValueError, OSError):
            previous = None
        if previous != job["settings"]:
            raise DataError(f"{work}: holds an interrupted preparation with other settings (inputs, tokenizer, "
                            "seq_len, shard or unit size); rerun that command to finish it, or delete it")
        _remove_temporaries(work)
        return work
    try:
        if storage.is_remote(output):
            storage.write_text(storage.join(work, storage.WRITING), "")
        else:
            os.makedirs(work, exist_ok=True)
            _remove_temporaries(work)
        write_json_atomic(job_path, job["settings"])
    except BaseException:  # Ctrl-C, a full disk: a work directory without its job.json is of no use
        with contextlib.suppress(Exception):
            storage.remove(work)
        raise
    return work


def finalize(job: dict, work_dir: str, output: str, markers: dict[int, dict], weights: list[float] | None) -> dict:
    """Writes index.json (last) from the units' markers, in unit order, and commits the output."""
    settings, tokenizer, inputs = job["settings"], job["tokenizer"], job["inputs"]
    shards, sources_ = [], []
    rows = 0
    masked = "instruction" in settings
    for s, spec in enumerate(inputs):
        start, documents, tokens, trained = rows, 0, 0, 0
        for i, unit in enumerate(job["units"]):
            if unit["source"] != s:
                continue
            m = markers[i]
            shards += m["shards"]
            rows += sum(sh["rows"] for sh in m["shards"])
            documents += m["documents"]
            tokens += m["tokens"]
            trained += m.get("trained_tokens", 0)
        if documents == 0:
            raise DataError(f"{spec}: no {'records' if masked else 'documents'}")
        sources_.append({"name": spec, "path": settings["inputs"][s], "documents": documents, "tokens": tokens,
                         "rows": [start, rows]})
        if masked:
            sources_[-1]["trained_tokens"] = trained
    counts = [s["rows"][1] - s["rows"][0] for s in sources_]
    resolved = list(weights) if weights is not None else counts
    for source, w in zip(sources_, resolved):
        source["weight"] = float(w) / float(sum(resolved))
    index = {
        "format": settings["format"], "seq_len": settings["seq_len"], "num_rows": rows,
        "vocab_size": tokenizer["vocab_size"],
        "max_token_id": max(m["max_token_id"] for m in markers.values()),
        "tokenizer": {"name": tokenizer["name"], "path": tokenizer["path"], "bos_id": tokenizer["bos_id"],
                      "eos_id": tokenizer["eos_id"], "pad_id": tokenizer["pad_id"]},
        "sources": sources_, "shards": shards,
    }
    if masked:
        index["instruction"] = settings["instruction"]
    keep = {INDEX} | {sh[a] for sh in shards for a in (*ARRAYS, MASK) if a in sh}
    stale = [n for n in storage.listdir(work_dir)  # markers, job.json, files of an earlier plan's units
             if n not in keep and n not in (storage.WRITING, storage.COMMITTED)]
    storage.map_threads(lambda n: storage.remove(storage.join(work_dir, n)), stale)
    write_json_atomic(storage.join(work_dir, INDEX), index)
    if storage.is_remote(output):
        storage.write_text(storage.join(output, storage.COMMITTED), "")
    else:
        if os.path.isdir(output):
            os.rmdir(output)  # an empty directory given as the output
        os.rename(work_dir, output)
    return index


def _new_ancestor(output: str) -> str | None:
    """The top-most missing directory above a local output (`start` creates it), removed with the work
    directory when a run leaves nothing; None if the parent exists or the output is remote."""
    if storage.is_remote(output):
        return None
    top, parent = None, os.path.dirname(os.path.abspath(output))
    while parent and not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    return top


def _discard(work_dir: str, new_ancestor: str | None) -> None:
    """Removes the work directory and the directories created above it (if still empty)."""
    with contextlib.suppress(Exception):
        storage.remove(work_dir)
    if new_ancestor is not None:
        d = os.path.dirname(os.path.abspath(work_dir))
        while d == new_ancestor or d.startswith(new_ancestor + os.sep):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)


def _after_failure(job: dict, work_dir: str, new_ancestor: str | None) -> None:
    """Removes the temporaries; keeps the committed units for a rerun, or everything goes if there are none."""
    _remove_temporaries(work_dir)
    with contextlib.suppress(Exception):
        _, done = pending_units(job, work_dir)  # from the disk: workers may have committed more than we heard
        if not done:
            _discard(work_dir, new_ancestor)
        else:
            print(f"normistral: kept {len(done)} of {len(job['units'])} committed units in {work_dir}; rerun the "
                  "same command to resume", file=sys.stderr)


def prepare_data(tokenizer_dir: str, inputs: list[str], output_dir: str, seq_len: int, *,
                 weights: list[float] | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 workers: int | None = None, unit_bytes: int = src.DEFAULT_UNIT_BYTES, text_column: str | None = None,
                 engine: str = "local", progress: bool = True, vocab_size: int | None = None,
                 prompt_field: str | None = None, completion_field: str | None = None, template: str | None = None
                 ) -> dict:
    """Tokenize and pack `inputs` (one source each) into `output_dir` (local or gs://); return the index.

    Prompt/completion records instead of text when any of `prompt_field` (default "prompt"),
    `completion_field` (default "completion") or `template` (holding `{0}` once) is given: only the
    completions and their `</s>` are trained on (the module docstring; the index is then format 2).

    `weights` (one per input) set the sampling mix; by default each source weighs its number of rows.
    `text_column` (plain text; default "text"): the text field of JSON lines, column of Parquet and datasets.
    `workers`: processes on this machine (default: all cores); `engine="ray"` runs the units as Ray tasks
    on the cluster `ray.init()` finds (training.prepare_ray). Rerunning after an interruption resumes.
    `vocab_size` (the model's): a tokenizer with a larger vocabulary is refused before any work, so no
    token id can reach past the model's embedding (training/validate.py).
    """
    inputs = [os.fspath(i) for i in inputs]
    _check_args(inputs, weights, seq_len, shard_tokens, unit_bytes, workers)
    instruction = instruction_settings(prompt_field, completion_field, template)
    if instruction is not None and text_column is not None:
        raise DataError("--text-column is for plain text; prompt/completion records are read with --prompt-field "
                        "and --completion-field")
    text_column = "text" if text_column is None else text_column
    if engine not in ("local", "ray"):
        raise DataError(f"engine must be 'local' or 'ray', got {engine!r}")
    if engine == "ray":
        from training.prepare_ray import check_cluster

        check_cluster()  # an unreachable RAY_ADDRESS: one line now, not minutes of retries after the plan
    tokenizer = load_tokenizer(tokenizer_dir)
    if vocab_size is not None:
        from training.validate import check_vocabulary  # (imports JAX: the parent only, never the workers)

        check_vocabulary(tokenizer["vocab_size"], vocab_size, f"{tokenizer_dir}: the tokenizer has")
    job = plan(tokenizer, inputs, int(seq_len), shard_tokens=shard_tokens, unit_bytes=unit_bytes,
               text_column=text_column, instruction=instruction)
    output = storage.resolve(output_dir)
    new_ancestor = _new_ancestor(output)
    try:
        work = start(job, output)
    except BaseException:  # (with a new ancestor, no earlier run's work directory can be there)
        if new_ancestor is not None:
            _discard(_work_dir(output), new_ancestor)
        raise
    try:
        markers = _run_units(job, work, output, engine, workers, progress)
    except BaseException:
        _after_failure(job, work, new_ancestor)
        raise
    try:
        return finalize(job, work, output, markers, weights)
    except DataError:  # a refusal of the whole job ("no documents"): a rerun would refuse again, keep nothing
        _discard(work, new_ancestor)
        raise
    except BaseException:
        _after_failure(job, work, new_ancestor)
        raise


def _run_units(job: dict, work: str, output: str, engine: str, workers: int | None, progress: bool
               ) -> dict[int, dict]:
    """Runs the job's pending units with a progress bar; returns every unit's marker."""
    from tqdm import tqdm

    todo, markers = pending_units(job, work)
    if markers and progress:
        print(f"normistral: resuming {output}: {len(markers)} of {len(job['units'])} units already done",
              file=sys.stderr)
    bar = tqdm(total=len(job["units"]), initial=len(markers), desc="preparing", unit=" units",
               disable=not progress)
    total_tokens = sum(m["tokens"] for m in markers.values())

    def on_done(i, marker):
        nonlocal total_tokens
        markers[i] = marker
        total_tokens += marker["tokens"]
        bar.update(1)
        bar.set_postfix(tokens=f"{total_tokens:,}", refresh=False)

    try:
        if engine == "ray":
            from training.prepare_ray import run_ray

            run_ray(job, todo, work, on_done, run_unit=run_unit, num_cpus=workers)
        else:
            run_local(job, todo, work, workers or os.cpu_count() or 1, on_done)
    finally:
        bar.close()  # before any error line: the error must be the last line, on its own
    return markers
