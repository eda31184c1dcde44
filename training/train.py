"""The training loop behind `normistral train --config X.yaml --workdir DIR [--set key=value ...]`.

Inside: `run_training(config_path, workdir, overrides)`, `TrainingError`, `NonFiniteError`,
`ensure_data(run, workdir)` (builds the bundled corpus's tokenizer and packed data when missing),
`open_datasets`.

What a run does, in order:
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
4. steps until `train.steps`: batch `s` is `PackedDataset.batch(s, ...)`, a pure function of the step,
   so a resumed run sees exactly the batches the uninterrupted run would have: resumed losses are
   bit-identical. Each step writes one JSON line to `<workdir>/metrics.jsonl` (process 0): step, loss
   (float32 value as a full-precision float), grad_norm, learning_rate, loss_tokens, tokens_per_s, mfu
   (training/metrics.py states the FLOP count), step_time_s, skipped_steps, mntp, and eval_loss on
   evaluation steps. A resumed run first drops lines past its checkpoint, so the file keeps one line per
   step;
5. checkpoints every `checkpoint.every` steps and at the last step (async; training/checkpoint.py);
6. preemption: SIGTERM (or, on multi-host runs, JAX's preemption sync point, which all hosts reach at
   the same step) makes the loop save at the next step boundary, wait for the write, and return (exit 0);
7. a non-finite loss or gradient: the step's update is dropped inside the jitted step (state kept
   bit-for-bit, `skipped_steps` grows) under `train.nonfinite: skip`; under `abort` the run stops with
   `NonFiniteError` before anything else is saved (the last checkpoint is the last good state);
8. at the end, `train.export_hf` writes a Hugging Face directory of the final weights.

Host sync: the loop reads each step's metrics before the next step, which costs one device round trip
per step (negligible at 32K x 64 tokens per step) and keeps abort, preemption and logging exact.
"""

from __future__ import annotations

import glob
import math
import os
import signal
import threading
import time

import jax
import numpy as np

from jaxmodel.config import ARCHITECTURE_FIELDS, ConfigError
from jaxmodel.run_config import load_run_config
from jaxmodel.sharding import make_mesh
from training import step as steps_lib
from training.checkpoint import Checkpointer, fault
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
    return path if os.path.isabs(path) else os.path.join(workdir, path)


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
        raise ConfigError(f"{where}: data.corpus {corpus!r} matches no files")
    return files, heldout


def ensure_data(run: RunConfig, workdir: str) -> tuple[str, str | None]:
    """(train dir, eval dir or None); builds them from `data.corpus` when they do not exist yet.

    Building: a tokenizer is trained on the corpus into `data.tokenizer_dir` (unless one is there), then
    the documents are tokenized and packed into `seq_len`-token rows (`training.data.prepare_data`, one
    source per file). Each output appears under its final name only when complete (a temporary sibling
    renamed at the end), so an interrupted build is redone, never half used."""
    data_dir, eval_dir = _resolve(workdir, run.data.dir), _resolve(workdir, run.data.eval_dir)
    if run.data.corpus is None:
        if not os.path.isdir(data_dir):
            raise ConfigError(f"{run.path}: data.dir {data_dir} does not exist (and data.corpus is not set "
                              "to build it)")
        return data_dir, eval_dir if eval_dir and os.path.isdir(eval_dir) else None
    files, heldout = _corpus_files(run)
    if eval_dir is None and heldout:
        eval_dir = data_dir.rstrip("/") + "-heldout"
    todo = [(d, f) for d, f in ((data_dir, files), (eval_dir, heldout)) if d and f and not os.path.isdir(d)]
    if todo and jax.process_index() == 0:
        from training.data import prepare_data
        from training.tokenizer import train_tokenizer

        tokenizer_dir = _resolve(workdir, run.data.tokenizer_dir)
        if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
            _log(f"training a {run.model.vocab_size}-token tokenizer on {len(files)} corpus files -> "
                 f"{tokenizer_dir}")
            tmp = f"{tokenizer_dir}.tmp-{os.getpid()}"
            train_tokenizer(files, tmp, vocab_size=run.model.vocab_size)
            os.replace(tmp, tokenizer_dir)
        for out_dir, inputs in todo:
            _log(f"tokenizing and packing {len(inputs)} files into {run.train.seq_len}-token rows -> {out_dir}")
            prepare_data(tokenizer_dir, inputs, out_dir, run.train.seq_len, progress=False,
                         vocab_size=run.model.vocab_size)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("normistral data prepared")
    return data_dir, eval_dir if eval_dir and os.path.isdir(eval_dir) else None


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


def _host_batch(dataset, index: int, run: RunConfig) -> dict:
    batch = dataset.batch(index, global_batch_size=run.train.global_batch_size,
                          process_index=jax.process_index(), process_count=jax.process_count(), seed=run.data.seed)
    # The index's recorded largest id was checked when the data was opened; this guards the rows themselves
    # (a shard changed since) for the cost of one max per batch, before the ids reach the embedding lookup.
    check_token_ids(batch["input_ids"], run.model.vocab_size, f"{dataset.directory}: batch {index}")
    return batch


# -- state ------------------------------------------------------------------------------------------------------


def _initial_state(ts: steps_lib.TrainSetup, run: RunConfig) -> dict:
    if run.init_from is None:
        _log(f"random init ({run.model.num_params():,} parameters, seed {run.train.seed})")
        return steps_lib.init_state(ts)
    from flax import nnx

    from jaxmodel.config import MistralConfig
    from jaxmodel.convert import from_pretrained

    found = MistralConfig.from_hf(run.init_from)
    diff = [f"{k}: {getattr(found, k)} != {getattr(run.model, k)}" for k in ARCHITECTURE_FIELDS
            if getattr(found, k) != getattr(run.model, k)]
    if diff:
        raise ConfigError(f"{run.path}: model.init_from {run.init_from} does not match the model section "
                          f"({'; '.join(diff)})")
    _log(f"loading {run.init_from} onto mesh {dict(ts.mesh.shape)}")
    model = from_pretrained(run.init_from, dtype=run.model.weight_dtype, compute_dtype=run.model.compute_dtype,
                            mesh=ts.mesh, attention_impl=run.model.attention_impl, remat=run.model.remat,
                            scan_layers=run.model.scan_layers, progress=jax.process_index() == 0)
    params = nnx.to_pure_dict(nnx.split(model)[1])
    return steps_lib.state_from_params(ts, params)


def _check_same_model(meta: dict, run: RunConfig, where: str) -> None:
    """Refuses to resume a checkpoint of another architecture (a clear error instead of Orbax's)."""
    saved, ours = meta.get("model", {}), run.model.to_hf()
    diff = [f"{k}: {saved[k]} != {ours[k]}" for k in ARCHITECTURE_FIELDS if k in saved and saved[k] != ours[k]]
    if diff:
        raise ConfigError(f"{where}: the checkpoints there are of another model ({'; '.join(diff)}); "
                          "use another --workdir")


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


def _evaluate(eval_step, ts, params, dataset, run: RunConfig) -> float:
    total, count = 0.0, 0.0
    for i in range(run.train.eval_batches):
        s, n = eval_step(params, steps_lib.put_batch(ts, _host_batch(dataset, i, run)))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def run_training(config_path: str, workdir: str, overrides=(), *, datasets=None) -> dict:
    """Trains per the run config; returns a summary ({"step", "loss", "preempted", ...}).

    `datasets` (train, eval or None) replaces the configured data (tests)."""
    tree = load_run_config(config_path, list(overrides))
    run = load(tree)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    preemption = _Preemption()  # from the start: a notice during data preparation or compilation counts too
    try:
        return _train(run, workdir, datasets, preemption)
    finally:
        preemption.close()


def _train(run: RunConfig, workdir: str, datasets, preemption: _Preemption) -> dict:
    mesh = make_mesh(run.mesh)
    check_run(run, mesh)  # shapes vs the mesh: before data, weights, compiling or any write (validate.py)
    train_ds, eval_ds = datasets if datasets is not None else open_datasets(run, workdir)
    if run.train.eval_every and eval_ds is None:
        raise ConfigError(f"{run.path}: train.eval_every is set but there is no held-out data "
                          "(data.eval_dir, or data.corpus with held-out documents)")

    ts = steps_lib.setup(run, mesh)
    checkpointer = Checkpointer(_resolve(workdir, run.checkpoint.dir), run.checkpoint, meta=run.snapshot())
    latest = checkpointer.latest_step()
    if latest is not None:
        _log(f"resuming from checkpoint step {latest} in {checkpointer.directory}")
        _check_same_model(checkpointer.restore_meta(latest), run, checkpointer.directory)
        state = checkpointer.restore(latest, steps_lib.abstract_state(ts))
    else:
        state = _initial_state(ts, run)
    step = int(jax.device_get(state["step"]))
    metrics_log = MetricsLog(workdir, enabled=jax.process_index() == 0, resume_step=step, log=_log)
    train_step = steps_lib.make_train_step(ts)
    eval_step = steps_lib.make_eval_step(ts) if eval_ds is not None and run.train.eval_every else None
    flops = train_flops_per_step(run.model, run.train.global_batch_size, run.train.seq_len)
    peak = peak_flops(jax.devices()[0], run.train.peak_flops_per_device)
    peak_total = peak * jax.device_count() if peak else None
    summary = {"start_step": step, "step": step, "loss": None, "preempted": False, "workdir": workdir}
    _log(f"training {run.model.num_params():,} parameters on mesh {dict(ts.mesh.shape)} "
         f"({jax.device_count()} x {jax.devices()[0].device_kind}); steps {step} -> {run.train.steps}, "
         f"{run.train.global_batch_size} x {run.train.seq_len} tokens per step")

    from tqdm.auto import tqdm

    bar = tqdm(total=run.train.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    try:
        with jax.set_mesh(ts.mesh):
            next_batch = _prepared_batch(ts, train_ds, step, run) if step < run.train.steps else None
            while step < run.train.steps:
                started = time.perf_counter()  # step time: dispatch to metrics on the host (eval, saves excluded)
                state, metrics = train_step(state, next_batch)
                if step + 1 < run.train.steps:  # host work for the next batch overlaps the device step
                    next_batch = _prepared_batch(ts, train_ds, step + 1, run)
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
                    record["eval_loss"] = _evaluate(eval_step, ts, state["params"], eval_ds, run)
                metrics_log.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                summary.update(step=step, loss=record["loss"])
                preempted = preemption.reached(step)
                if preempted or step % run.checkpoint.every == 0 or step == run.train.steps:
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
            _export(ts, state, _resolve(workdir, run.train.export_hf), run)
    finally:
        bar.close()
        metrics_log.close()
        try:
            checkpointer.close()
        except Exception:  # noqa: BLE001 (already closed, or the original error matters more)
            pass
    return summary


def _prepared_batch(ts, dataset, index: int, run: RunConfig) -> dict:
    host = _host_batch(dataset, index, run)
    if fault("nan_at_step") == index + 1:  # tests: poison this step's loss weights with NaN
        host = dict(host, loss_mask=np.full(np.shape(host["loss_mask"]), math.nan, np.float32))
    return steps_lib.put_batch(ts, host)


def _export(ts, state, path: str, run: RunConfig) -> None:
    from flax import nnx

    from jaxmodel.convert import copy_tokenizer_files, save_pretrained

    exists = os.path.isdir(path) and bool(os.listdir(path))
    if jax.process_count() > 1:  # every process must take the same branch: the export is a collective
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if exists:
        _log(f"export: {path} already exists; not overwritten")
        return
    _log(f"exporting the final weights to {path} (Hugging Face format)")
    save_pretrained(nnx.merge(ts.graphdef, state["params"]), path, dtype=run.train.export_dtype,
                    progress=False)
    # The starting directory's tokenizer goes along, so the export is a complete model directory.
    if run.init_from and jax.process_index() == 0:
        copy_tokenizer_files(run.init_from, path)
