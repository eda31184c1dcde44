"""The training loop behind `normistral train --config X.yaml --workdir DIR [--set key=value ...]`.

Inside: `run_training(config_path, workdir, overrides)`, `TrainingError`, `NonFiniteError`,
`ensure_data(run, workdir)` (builds the bundled corpus's tokenizer and packed data when missing),
`open_datasets`. Over ~500 lines because the run's order below is one procedure over one run state (its
parts already live apart: training/config, validate, step, data, checkpoint, lora_train, metrics).

What a run does, in order:
0. before any work: a checkpoint past `train.steps` is refused (one line naming both steps); a checkpoint
   at `train.steps` whose export (if any) is written leaves nothing to do (summary `nothing_to_do`);
   `train.export_hf` must be free (a non-empty directory is refused now, not found after training) and
   an absolute one's parent must exist (never created silently). A failed run removes the workdir it
   created itself while that holds no file (a user's existing directory is never removed);
1. reads the YAML (training/config.py), builds the mesh (`mesh:` section over all devices), checks the
   run's shapes against it (training/validate.py: batch and microbatches vs data x fsdp, every
   parameter and activation dimension vs its mesh axis), then the train setup (shardings, optimizer,
   jitted steps: training/step.py);
2. data: opens `data.dir` (a PackedDataset directory, relative to the workdir); with `data.corpus`, a
   missing directory is built first (tokenizer + packing), so a tiny run works from a clean clone; its
   index is checked against the run (seq_len, vocabulary and largest token id, bos/eos/pad ids) before
   anything compiles or is written;
3. state: the newest finalized checkpoint under `<workdir>/<checkpoint.dir>` if there is one (resume;
   restored straight into the current mesh's shardings, whatever mesh saved it), else
   `model.init_from` (a Hugging Face or import-hf directory, loaded shard by shard onto the mesh), else a
   random init (seeded by `train.seed`);
   with a `lora:` section (training/lora_train.py) the trained state is the adapters only: the frozen
   base (possibly quantized at load: QLoRA) is loaded from `model.init_from` (or is the random init of
   `train.seed`) at every start, resumes included, and never saved;
4. steps until `train.steps`: batch `s` is `PackedDataset.batch(s, ...)`, a pure function of the step,
   so a resumed run sees exactly the batches the uninterrupted run would have: resumed losses are
   bit-identical. Each step writes one JSON line to `<workdir>/metrics.jsonl` (process 0): step, loss
   (float32 value as a full-precision float), grad_norm, learning_rate, loss_tokens, tokens_per_s, mfu
   (training/metrics.py states the FLOP count), step_time_s, skipped_steps, mntp, and eval_loss on
   evaluation steps; with `train.eval_tasks`, also the lm-eval scores "eval/<task>/<metric>" that the
   caller's `eval_hook(model, step) -> {name: value}` returns (every process calls it: it computes on
   the mesh; `normistral train` builds it from inference/lm_eval_adapter.py). A resumed run first drops
   lines past its checkpoint, so the file keeps one line per step;
5. checkpoints every `checkpoint.every` steps and at the last step (async; training/checkpoint.py);
6. preemption: SIGTERM (or, on multi-host runs, JAX's preemption sync point, which all hosts reach at
   the same step) makes the loop save at the next step boundary, wait for the write, and return (exit 0);
7. a non-finite loss or gradient: the step's update is dropped inside the jitted step (state kept
   bit-for-bit, `skipped_steps` grows) under `train.nonfinite: skip`; under `abort` the run stops with
   `NonFiniteError` before anything else is saved (the last checkpoint is the last good state);
8. at the end, `train.export_hf` writes a Hugging Face directory of the final weights (a directory that
   appeared there during the run is not overwritten: an error, the weights are in the checkpoint).

Paths: the workdir and every path in it (data, tokenizer, checkpoints, metrics, TensorBoard, the export)
may be local or on gs:// (`jaxmodel.storage`; Orbax writes checkpoints to gs:// itself). Data built from a
corpus for a gs:// workdir is prepared on local scratch and uploaded into a committed directory.

Host sync: the loop reads each step's metrics before the next step, which costs one device round trip
per step (negligible at 32K x 64 tokens per step) and keeps abort, preemption and logging exact.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import signal
import tempfile
import threading
import time

import jax
import numpy as np

from jaxmodel import storage
from jaxmodel.config import ARCHITECTURE_FIELDS, ConfigError
from jaxmodel.hub import HubError, resolve_model
from jaxmodel.run_config import load_run_config
from jaxmodel.sharding import make_mesh
from training import lora_train
from training import step as steps_lib
from training.checkpoint import Checkpointer, fault, latest_finalized_step
from training.config import RunConfig, load
from training.metrics import MetricsLog, peak_flops, stderr_log, train_flops_per_step
from training.validate import check_dataset, check_run, check_token_ids

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
BUNDLED_HELDOUT = "heldout.jsonl"


class TrainingError(RuntimeError):
    """A run that cannot go on (the message says why and what was kept)."""


class NonFiniteError(TrainingError):
    pass


def _log(message: str) -> None:
    if jax.process_index() == 0:
        stderr_log(message)


def _resolve(workdir: str, path: str | None) -> str | None:
    if path is None:
        return None
    return storage.under(workdir, path)  # absolute paths and gs:// URLs as given


# -- data ---------------------------------------------------------------------------------------------------


def _corpus_files(run: RunConfig) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents) named by `data.corpus` / `data.heldout`."""
    corpus, where = run.data.corpus, run.path
    if corpus == "bundled":
        files = sorted(f for f in glob.glob(os.path.join(CORPUS_DIR, "*.jsonl"))
                       if os.path.basename(f) != BUNDLED_HELDOUT)
        heldout = [os.path.join(CORPUS_DIR, BUNDLED_HELDOUT)]
    else:
        base = os.path.dirname(where)
        pattern = corpus if os.path.isabs(corpus) else os.path.join(base, corpus)
        files = sorted(glob.glob(pattern))
        heldout = []
    if run.data.heldout:
        h = run.data.heldout
        heldout = sorted(glob.glob(h if os.path.isabs(h) else os.path.join(os.path.dirname(where), h)))
    if not files:
        raise ConfigError(f"{run.where('data.corpus')}: data.corpus {corpus!r} matches no files")
    return files, heldout


def ensure_data(run: RunConfig, workdir: str) -> tuple[str, str | None]:
    """(train dir, eval dir or None); builds them from `data.corpus` when they do not exist yet.

    Building: a tokenizer is trained on the corpus into `data.tokenizer_dir` (unless one is there), then
    the documents are tokenized and packed into `seq_len`-token rows (`training.prepare.prepare_data`, one
    source per file). Each output appears under its final name only when complete (a temporary sibling
    renamed at the end), so an interrupted build is resumed, never half used. On gs:// each is built on
    local scratch and uploaded into a `storage.atomic_directory` (committed by its marker when complete)."""
    data_dir, eval_dir = _resolve(workdir, run.data.dir), _resolve(workdir, run.data.eval_dir)
    if run.data.corpus is None:
        if storage.isfile(data_dir):
            raise ConfigError(f"{run.where('data.dir')}: data.dir {data_dir} is a file, expected a prepared data "
                              "directory (normistral prepare-data)")
        if not storage.isdir(data_dir):
            storage.check_bucket(data_dir)
            raise ConfigError(f"{run.where('data.dir')}: data.dir {data_dir} does not exist (and data.corpus is "
                              "not set to build it)")
        storage.require_committed(data_dir, "data directory")
        return data_dir, eval_dir if eval_dir and storage.isdir(eval_dir) else None
    files, heldout = _corpus_files(run)
    if eval_dir is None and heldout:
        eval_dir = data_dir.rstrip("/") + "-heldout"
    todo = [(d, f) for d, f in ((data_dir, files), (eval_dir, heldout)) if d and f and not _complete(d, "index.json")]
    if todo and jax.process_index() == 0:
        from training.prepare import prepare_data
        from training.tokenizer import train_tokenizer

        tokenizer_dir = _resolve(workdir, run.data.tokenizer_dir)
        with tempfile.TemporaryDirectory(prefix="normistral-data-") as scratch:
            local_tok = tokenizer_dir if not storage.is_remote(tokenizer_dir) else os.path.join(scratch, "tokenizer")
            if not _complete(tokenizer_dir, "tokenizer.json"):
                _log(f"training a {run.model.vocab_size}-token tokenizer on {len(files)} corpus files -> "
                     f"{tokenizer_dir}")
                tmp = f"{local_tok}.tmp-{os.getpid()}"
                train_tokenizer(files, tmp, vocab_size=run.model.vocab_size)
                os.replace(tmp, local_tok)
                _publish(local_tok, tokenizer_dir)
            elif local_tok != tokenizer_dir:
                storage.copy_dir(tokenizer_dir, local_tok)
            for k, (out_dir, inputs) in enumerate(todo):
                _log(f"tokenizing and packing {len(inputs)} files into {run.train.seq_len}-token rows -> {out_dir}")
                local_out = out_dir if not storage.is_remote(out_dir) else os.path.join(scratch, f"out-{k}")
                prepare_data(local_tok, inputs, local_out, run.train.seq_len, workers=1, progress=False,
                             vocab_size=run.model.vocab_size)
                _publish(local_out, out_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("normistral data prepared")
    return data_dir, eval_dir if eval_dir and storage.isdir(eval_dir) else None


def _complete(directory: str, marker_file: str) -> bool:
    """A built directory: it has `marker_file` and, on gs://, its commit marker."""
    return storage.isfile(storage.join(directory, marker_file)) and storage.is_committed(directory)


def _publish(local_dir: str, target: str) -> None:
    """Uploads a directory built on local scratch to its gs:// target (committed when complete)."""
    if not storage.is_remote(target):
        return
    with storage.atomic_directory(target) as out:
        storage.upload_dir(local_dir, out)


def open_datasets(run: RunConfig, workdir: str):
    """(train dataset, eval dataset or None), each with `batch(step, global_batch_size=..., ...)`."""
    from training.data import PackedDataset

    data_dir, eval_dir = ensure_data(run, workdir)
    tokenizer_dir = _resolve(workdir, run.data.tokenizer_dir)
    train = PackedDataset.open(data_dir)
    check_dataset(data_dir, run, "data.dir", tokenizer_dir=tokenizer_dir)  # before compiling (validate.py)
    if eval_dir:
        check_dataset(eval_dir, run, "data.eval_dir", tokenizer_dir=tokenizer_dir)
    return train, (PackedDataset.open(eval_dir) if eval_dir else None)


def _host_batch(dataset, index: int, ts: steps_lib.TrainSetup) -> dict:
    """This process's part of batch `index`: the rows x sequence columns its devices hold (`batch_part`:
    whole rows, unless the mesh's `context` axis spans hosts), read from those rows and columns only."""
    run = ts.run
    part = steps_lib.batch_part(ts.batch_sharding, (run.train.global_batch_size, run.train.seq_len))
    batch = dataset.batch(index, global_batch_size=run.train.global_batch_size, rows=part.rows,
                          columns=part.columns, seed=run.data.seed)
    # The index's recorded largest id was checked when the data was opened; this guards the rows themselves
    # (a shard changed since) for the cost of one max per batch, before the ids reach the embedding lookup.
    check_token_ids(batch["input_ids"], run.model.vocab_size, f"{dataset.directory}: batch {index}")
    return batch


# -- state ------------------------------------------------------------------------------------------------------


def initial_state(ts: steps_lib.TrainSetup, run: RunConfig) -> dict:
    if run.lora is not None:
        return _initial_lora_state(ts, run)
    if run.init_from is None:
        _log(f"random init ({run.model.num_params():,} parameters, seed {run.train.seed})")
        return steps_lib.init_state(ts)
    from flax import nnx

    from jaxmodel import safetensors_io
    from jaxmodel.convert import from_pretrained

    _check_init_from(run)
    _log(f"loading {run.init_from} onto mesh {dict(ts.mesh.shape)}")
    before = safetensors_io.bytes_read()
    model = from_pretrained(run.init_from, dtype=run.model.weight_dtype, compute_dtype=run.model.compute_dtype,
                            mesh=ts.mesh, attention_impl=run.model.attention_impl, remat=run.model.remat,
                            scan_layers=run.model.scan_layers, progress=jax.process_index() == 0)
    if safetensors_io.bytes_read() > before:  # a Hugging Face directory: each process reads only its slices
        _log(f"read {(safetensors_io.bytes_read() - before) / 1e6:,.1f} MB of tensors on process 0 "
             f"(of {jax.process_count()})")
    params = nnx.to_pure_dict(nnx.split(model)[1])
    return steps_lib.state_from_params(ts, params)


def _initial_lora_state(ts: steps_lib.TrainSetup, run: RunConfig) -> dict:
    """Step 0 of a LoRA run: the frozen base (quantized if asked) and the starting adapters."""
    base = run.init_from or f"a random base (seed {run.train.seed})"
    quantized = f", quantized to {run.lora.base_quantize}" if run.lora.base_quantize else ""
    start = run.lora.init_from_adapter or "fresh adapters"
    _log(f"LoRA rank {run.lora.rank} on {', '.join(run.lora.target_modules)} over {base}{quantized}; "
         f"starting from {start}")
    frozen, adapters = lora_train.load_base(run, ts.mesh, ts.state_shardings["frozen"])
    return {**steps_lib.state_from_params(ts, adapters), "frozen": frozen}


def _check_same_model(meta: dict, run: RunConfig, where: str) -> None:
    """Refuses to resume a checkpoint of another architecture (a clear error instead of Orbax's)."""
    saved, ours = meta.get("model", {}), run.model.to_hf()
    diff = [f"{k}: {saved[k]} != {ours[k]}" for k in ARCHITECTURE_FIELDS if k in saved and saved[k] != ours[k]]
    if diff:
        raise ConfigError(f"{where}: the checkpoints there are of another model ({'; '.join(diff)}); "
                          "use another --workdir")


def _unreadable(step_dir: str, e: Exception) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore details")[0]
    return (f"{step_dir}: cannot restore this checkpoint, its files are truncated or corrupt ({first[:200]}); "
            "move the step directory away to resume from the one before")


class _Preemption:
    """SIGTERM -> a flag read once per step. On multi-host runs JAX's coordination service owns SIGTERM
    and `reached_preemption_sync_point` tells every host the same step to stop at."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.requested:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service not enabled for this run
                return False
        return False

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# -- the loop -------------------------------------------------------------------------------------------------


def _evaluate(eval_step, ts, state, dataset, run: RunConfig) -> float:
    total, count = 0.0, 0.0
    frozen = () if "frozen" not in state else (state["frozen"],)
    for i in range(run.train.eval_batches):
        s, n = eval_step(state["params"], steps_lib.put_batch(ts, _host_batch(dataset, i, ts)), *frozen)
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def _make_workdir(workdir: str) -> str:
    """The run's directory (local, created if needed, or gs:// in an existing bucket); a StorageError
    naming it when it cannot be used (checked before any data is built or any step compiled)."""
    path = storage.check_bucket(workdir)
    if storage.is_remote(path):
        if storage.isfile(path):
            raise storage.StorageError(f"{workdir}: is an object, expected a directory for the run (--workdir)")
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise storage.StorageError(f"{workdir}: is a file, expected a directory for the run (--workdir)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise storage.StorageError(f"{workdir}: cannot create the run directory (--workdir): "
                                   f"{(e.strerror or str(e)).lower()}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise storage.StorageError(f"{workdir}: the run directory (--workdir) is not writable")
    return path


def _check_mesh(run: RunConfig) -> None:
    """The mesh section fits the devices (before any data is built)."""
    from jaxmodel.sharding import ShardingError

    try:
        run.mesh.resolve(jax.device_count())
    except ShardingError as e:
        raise ShardingError(f"{run.where('mesh')}: {e}") from None


def _check_export(run: RunConfig, workdir: str) -> None:
    """`train.export_hf` can be written after the last step: checked before any work, so a run is never
    trained only to find its export occupied. A relative path lies in the workdir (its parents are made
    at the end); an absolute one's parent must exist (it is not created silently, a typo would be)."""
    if not run.train.export_hf or jax.process_index() != 0:
        return
    export = run.train.export_hf
    path = _resolve(workdir, export)
    inside = not (storage.is_remote(export) or os.path.isabs(export))
    if inside and not storage.isdir(os.path.dirname(path)):
        return  # nothing can be there yet: the workdir (or a folder in it) is still to be made
    try:
        storage.check_output_dir(path, create_parents=False)
    except storage.StorageError as e:
        raise storage.StorageError(f"{run.where('train.export_hf')}: train.export_hf: {e} (it is written after "
                                   "the last step and never overwritten: remove it or name another)") from None


def _latest_step(run: RunConfig, workdir: str) -> int | None:
    """The newest finalized checkpoint's step (training/checkpoint.py `latest_finalized_step`)."""
    try:
        return latest_finalized_step(_resolve(workdir, run.checkpoint.dir))
    except OSError:  # no such directory (a new run), or --workdir is a file (reported next)
        return None


def _check_steps(run: RunConfig, latest: int | None, workdir: str) -> None:
    """A run resumed past its own end is refused (train.steps below the checkpoint's step): training would
    do nothing and a lower train.steps is most likely a mistake (another run's config or workdir)."""
    if latest is not None and latest > run.train.steps:
        raise TrainingError(f"{run.where('train.steps')}: train.steps={run.train.steps} is below the step of the "
                            f"latest checkpoint in {_resolve(workdir, run.checkpoint.dir)} ({latest}); raise "
                            "train.steps to continue that run, or use another --workdir")


def _finished(run: RunConfig, latest: int | None, workdir: str) -> bool:
    """The checkpoint is at train.steps and the export (if any) is written: nothing is left to do (at
    train.steps without its export, the run loads the checkpoint and exports it)."""
    if latest != run.train.steps:
        return False
    return not run.train.export_hf or _exported(_resolve(workdir, run.train.export_hf))


def _check_init_from(run: RunConfig) -> None:
    """`model.init_from` exists, is a model directory, and matches the model section: checked before data
    is built or anything compiled."""
    if run.init_from is None:
        return
    from jaxmodel.config import MistralConfig
    from jaxmodel.convert import config_source

    where = run.where("model.init_from")
    try:
        init_from = resolve_model(run.init_from)  # a hub id: its snapshot, fetched now if not cached
    except HubError as e:
        raise HubError(f"{where}: model.init_from {e}") from None
    if not storage.isdir(init_from):
        storage.check_bucket(init_from)
        what = "is a file" if storage.exists(init_from) else "does not exist"
        raise storage.StorageError(f"{where}: model.init_from {run.init_from} {what}; expected a Hugging Face or "
                                   "import-hf model directory")
    found = MistralConfig.from_hf(config_source(init_from))
    diff = [f"{k}: {getattr(found, k)} != {getattr(run.model, k)}" for k in ARCHITECTURE_FIELDS
            if getattr(found, k) != getattr(run.model, k)]
    if diff:
        raise ConfigError(f"{where}: model.init_from {run.init_from} does not match the model section "
                          f"({'; '.join(diff)})")


def run_training(config_path: str, workdir: str, overrides=(), *, datasets=None, eval_hook=None) -> dict:
    """Trains per the run config; returns a summary ({"step", "loss", "preempted", ...}).

    `datasets` (train, eval or None) replaces the configured data (tests). `eval_hook(model, step)`: called
    on `train.eval_tasks` steps with the current weights as a model; returns {"task/metric": value}."""
    tree = load_run_config(config_path, list(overrides))
    run = load(tree)
    _check_mesh(run)
    resolved = storage.resolve(workdir)
    latest = _latest_step(run, resolved)
    _check_steps(run, latest, resolved)
    if latest is None or run.lora is not None:  # a resumed run no longer reads init_from (LoRA: its base)
        _check_init_from(run)
    lora_train.check_lora(run)
    if _finished(run, latest, resolved):
        return {"start_step": latest, "step": latest, "loss": None, "preempted": False, "workdir": resolved,
                "nothing_to_do": True}
    _check_export(run, resolved)
    created = _first_missing_dir(resolved)
    workdir = _make_workdir(workdir)  # a local path or a gs:// URL in an existing bucket
    preemption = _Preemption()  # from the start: a notice during data preparation or compilation counts too
    try:
        return _train(run, workdir, datasets, preemption, eval_hook)
    except BaseException:
        _remove_if_empty(created)
        raise
    finally:
        preemption.close()


def _first_missing_dir(workdir: str) -> str | None:
    """The outermost local directory that making `workdir` creates (None if it exists, or on gs://)."""
    missing, path = None, workdir
    while not storage.is_remote(path) and not os.path.lexists(path) and os.path.dirname(path) != path:
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_if_empty(created: str | None) -> None:
    """After a failed run: removes the directory tree it created itself if that holds no file (a user's
    existing directory is never `created`; data or checkpoints already written are kept)."""
    if created is None or jax.process_index() != 0:
        return
    if os.path.isdir(created) and not any(files for _, _, files in os.walk(created)):
        shutil.rmtree(created, ignore_errors=True)


def _train(run: RunConfig, workdir: str, datasets, preemption: _Preemption, eval_hook=None) -> dict:
    if run.train.eval_tasks and eval_hook is None:
        raise ConfigError(f"{run.path}: train.eval_tasks needs an evaluation hook (normistral train builds one; "
                          "from Python, pass run_training(..., eval_hook=...))")
    mesh = make_mesh(run.mesh)
    check_run(run, mesh)  # shapes vs the mesh: before data, weights, compiling or any write (validate.py)
    train_ds, eval_ds = datasets if datasets is not None else open_datasets(run, workdir)
    if run.train.eval_every and eval_ds is None and not run.train.eval_tasks:
        raise ConfigError(f"{run.where('train.eval_every')}: train.eval_every is set but there is no held-out data "
                          "(data.eval_dir, or data.corpus with held-out documents)")

    ts = steps_lib.setup(run, mesh)
    checkpointer = Checkpointer(_resolve(workdir, run.checkpoint.dir), run.checkpoint, meta=run.snapshot(),
                                model_config=run.model.to_hf())
    latest = checkpointer.latest_step()
    if latest is not None:
        _log(f"resuming from checkpoint step {latest} in {checkpointer.directory}")
        step_dir = os.path.join(checkpointer.directory, str(latest))
        try:
            meta = checkpointer.restore_meta(latest)
        except Exception as e:  # noqa: BLE001 (Orbax raises several kinds for an unreadable file)
            raise TrainingError(_unreadable(step_dir, e)) from None
        _check_same_model(meta, run, checkpointer.directory)
        lora_train.check_resume(meta, run, checkpointer.directory)
        try:
            state = checkpointer.restore(latest, steps_lib.abstract_state(ts))
        except Exception as e:  # noqa: BLE001 (TensorStore raises bare Exceptions for truncated chunks)
            raise TrainingError(_unreadable(step_dir, e)) from None
        if run.lora is not None:  # checkpoints hold the adapters only: the frozen base is loaded again
            state["frozen"] = lora_train.load_base(run, ts.mesh, ts.state_shardings["frozen"], with_adapters=False)[0]
    else:
        state = initial_state(ts, run)
    step = int(jax.device_get(state["step"]))
    metrics_log = MetricsLog(workdir, enabled=jax.process_index() == 0, resume_step=step, log=_log)
    train_step = steps_lib.make_train_step(ts)
    eval_step = steps_lib.make_eval_step(ts) if eval_ds is not None and run.train.eval_every else None
    flops = train_flops_per_step(run.model, run.train.global_batch_size, run.train.seq_len)
    peak = peak_flops(jax.devices()[0], run.train.peak_flops_per_device)
    peak_total = peak * jax.device_count() if peak else None
    summary = {"start_step": step, "step": step, "loss": None, "preempted": False, "workdir": workdir,
               "nothing_to_do": step >= run.train.steps}  # at train.steps: only the export was left
    trained = f"{run.model.num_params():,} parameters" if run.lora is None else (
        f"{sum(x.size for x in jax.tree.leaves(ts.abstract_params)):,} adapter parameters over a frozen "
        f"{run.model.num_params():,}-parameter base")
    _log(f"training {trained} on mesh {dict(ts.mesh.shape)} "
         f"({jax.device_count()} x {jax.devices()[0].device_kind}); steps {step} -> {run.train.steps}, "
         f"{run.train.global_batch_size} x {run.train.seq_len} tokens per step")
    if jax.process_count() > 1:
        part = steps_lib.batch_part(ts.batch_sharding, (run.train.global_batch_size, run.train.seq_len))
        _log(f"process 0 of {jax.process_count()} reads {part.shape[0]} rows x {part.shape[1]} sequence columns "
             "of each batch")

    from tqdm.auto import tqdm

    bar = tqdm(total=run.train.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    from training.data import Prefetcher

    # This process's part of the next steps' batches, read on a background thread while the device computes.
    loader = Prefetcher(lambda index: _host_batch(train_ds, index, ts), step)
    try:
        with jax.set_mesh(ts.mesh):
            next_batch = _prepared_batch(ts, loader, step, run) if step < run.train.steps else None
            while step < run.train.steps:
                started = time.perf_counter()  # step time: dispatch to metrics on the host (eval, saves excluded)
                state, metrics = train_step(state, next_batch)
                if step + 1 < run.train.steps:  # host work for the next batch overlaps the device step
                    next_batch = _prepared_batch(ts, loader, step + 1, run)
                metrics = jax.device_get(metrics)
                step += 1
                step_time = time.perf_counter() - started
                record = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                          "learning_rate": float(metrics["learning_rate"]),
                          "loss_tokens": int(metrics["loss_tokens"]) if metrics["finite"] else None,
                          "tokens_per_s": run.train.tokens_per_step / step_time,
                          "mfu": flops / step_time / peak_total if peak_total else None,
                          "step_time_s": step_time, "skipped_steps": int(metrics["skipped"]),
                          "mntp": bool(metrics["mntp"])}
                if not metrics["finite"] and run.train.nonfinite == "abort":
                    checkpointer.wait()  # let an in-flight save of the last good state finish
                    raise NonFiniteError(
                        f"step {step}: non-finite loss ({record['loss']}) or gradient norm "
                        f"({record['grad_norm']}); aborting (train.nonfinite: abort). The update was not "
                        f"applied and nothing was saved; the last checkpoint is step "
                        f"{checkpointer.latest_step()}")
                if not metrics["finite"]:
                    _log(f"step {step}: non-finite loss or gradients, update skipped "
                         f"({record['skipped_steps']} skipped so far)")
                if eval_step is not None and (step % run.train.eval_every == 0 or step == run.train.steps):
                    record["eval_loss"] = _evaluate(eval_step, ts, state, eval_ds, run)
                if run.train.eval_tasks and (step % run.train.eval_every == 0 or step == run.train.steps):
                    scores = eval_hook(lora_train.merged_model(ts.graphdef, state["params"], state.get("frozen")), step)
                    record.update({f"eval/{k}": float(v) for k, v in scores.items()})
                metrics_log.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                summary.update(step=step, loss=record["loss"])
                preempted = preemption.reached(step)
                if preempted or step % run.checkpoint.every == 0 or step == run.train.steps:
                    metrics_log.sync()  # gs://: the lines up to this checkpoint are stored before it is
                    checkpointer.save(step, state, force=preempted)
                if preempted:
                    checkpointer.wait()
                    _log(f"preemption notice: saved checkpoint at step {step}; exiting")
                    summary["preempted"] = True
                    break
                if fault("sigterm_at_step") == step:  # tests: a preemption notice (SIGTERM) after step N
                    os.kill(os.getpid(), signal.SIGTERM)
                if fault("kill_at_step") == step:  # tests: die between steps, no save in flight
                    checkpointer.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
        checkpointer.close()
        if run.train.export_hf and not summary["preempted"] and step >= run.train.steps:
            summary["exported"] = _resolve(workdir, run.train.export_hf)
            _export(ts, state, summary["exported"], run)
    finally:
        loader.close()
        bar.close()
        metrics_log.close()
        try:
            checkpointer.close()
        except Exception:  # noqa: BLE001 (already closed, or the original error matters more)
            pass
    return summary


def _prepared_batch(ts, loader, index: int, run: RunConfig) -> dict:
    host = loader.get(index)
    if fault("nan_at_step") == index + 1:  # tests: poison this step's loss weights with NaN
        host = dict(host, loss_mask=np.full(np.shape(host["loss_mask"]), math.nan, np.float32))
    return steps_lib.put_batch(ts, host)


def _exported(path: str) -> bool:
    """A complete export is at `path` (an uncommitted one, left by an interrupted run, is redone)."""
    return bool(storage.listdir(path)) and storage.is_committed(path)


def _export(ts, state, path: str, run: RunConfig) -> None:
    from jaxmodel.convert import copy_tokenizer_files
    from jaxmodel.export import save_pretrained

    exists = _exported(path)
    if jax.process_count() > 1:  # every process must take the same branch: the export is a collective
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if exists:  # checked free before training (_check_export): another writer got there since
        raise TrainingError(f"{run.where('train.export_hf')}: train.export_hf {path} was written by someone else "
                            "during the run; not overwritten (the final weights are in the last checkpoint: "
                            "normistral export-hf)")
    _log(f"exporting the final weights to {path} (Hugging Face format)")
    model = lora_train.merged_model(ts.graphdef, state["params"], state.get("frozen"))
    if run.lora is not None:  # the adapters folded into the (full-precision) base: a plain checkpoint
        from jaxmodel.lora import merge_lora

        merge_lora(model)
    save_pretrained(model, path, dtype=run.train.export_dtype, progress=False)
    # The starting directory's tokenizer goes along, so the export is a complete model directory.
    if run.init_from and jax.process_index() == 0:
        copy_tokenizer_files(resolve_model(run.init_from), path)
