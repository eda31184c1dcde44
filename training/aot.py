"""Ahead-of-time compilation of the real train step for a TPU topology (`normistral compile-check --mode train`).

Inside: `compile_train(tree, topology, workdir=None, check_data=False) -> dict`.

It builds exactly what `run_training` jits (training/step.py: same optimizer, microbatch scan, chunked
loss, donated state), but over abstract inputs: the state comes from `jax.eval_shape` of the model and of
`optimizer.init`, each leaf a ShapeDtypeStruct carrying the NamedSharding the run would give it on a mesh
of the topology's devices (`jaxmodel.aot.tpu_devices`). libtpu compiles it as the pod would, and
`jaxmodel.aot.memory_report` reads the per-chip memory from the executable. Nothing is allocated and no
weights are read (`model.init_from` is not opened; the model section's preset gives the shapes).

Before compiling it runs the checks `normistral train` runs (training/validate.py): the batch and the
model's dimensions against the mesh, and the data's seq_len, vocabulary and special ids when its
directory is local and exists (`workdir`, as `train --workdir` would be given, or an absolute `data.dir`);
a remote (gs://) one only with `check_data` (`--check-data`), which also makes missing data an error. So
the fit check runs offline before any data exists, and a config's `gs://BUCKET` placeholder is reported
as not checked instead of stalling on the network. A program that cannot fit is reported with
`fits: false` and the compiler's figures (`jaxmodel.aot.compile_and_report`).

With context parallelism (mesh `context` > 1) the report adds `context_all_gathers`: the all-gathers in the
compiled program whose result spans the whole sequence (the per-layer K/V and mask-vector gathers of
jaxmodel/context_parallel.py), their count and per-chip result bytes as the program text holds them. The
layers run in a scanned loop, so these are one layer's worth (forward, and the backward's recompute).

Must run on the CPU backend with libtpu loadable (the CLI sets JAX_PLATFORMS=cpu before JAX starts).
"""

from __future__ import annotations

import re

import jax

from jaxmodel import storage
from jaxmodel.aot import compile_and_report, exhausted_report, hbm_bytes, memory_report, tpu_devices
from jaxmodel.config import ConfigError
from jaxmodel.context_parallel import context_size
from jaxmodel.sharding import make_mesh
from training import step as steps_lib
from training.config import load
from training.metrics import train_flops_per_step
from training.validate import check_dataset, check_run

# A bucket name Cloud Storage accepts (lowercase letters, digits, '-', '_', '.'; 3-63 characters): a
# config's placeholder (gs://BUCKET/...) is not one, so it is known for what it is without a network call.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")


class _NotChecked(Exception):
    """Why a data directory was not read; `fatal`: an error under --check-data (not a fit question)."""

    def __init__(self, message: str, fatal: bool = True):
        super().__init__(message)
        self.fatal = fatal


def _data_path(role: str, path: str, workdir: str | None, check: bool) -> str:
    """The data directory `path` as train would open it; `_NotChecked` saying why when it is not to be
    read now (an error under `check` if fatal, else a note in the report)."""
    if not (storage.is_remote(path) or path.startswith("/")):
        if workdir is None:
            raise _NotChecked(f"{role} {path} is relative to the workdir: pass --workdir")
        path = storage.join(workdir, path)
    if storage.is_remote(path):
        name = (storage.bucket(path) or "").partition("://")[2]
        if not _BUCKET_NAME.fullmatch(name):
            raise _NotChecked(f"{role} {path}: {name!r} is a placeholder, not a bucket name")
        if not check:
            raise _NotChecked(f"{role} {path} is remote: pass --check-data to read it", fatal=False)
        storage.check_bucket(path)
    return path


def _check_data(run, workdir: str | None, check: bool = False) -> str:
    """What was checked of the run's data (training/validate.py), as the report states it.

    Local data that exists is always checked (offline, cheap). Remote data is read only under `check`
    (`--check-data`), and then data that cannot be read is an error; without it a missing or remote
    directory is reported as not checked: the fit check runs before the data exists, offline, and a
    config's gs://BUCKET placeholder must not stall it on the network."""
    checked, notes = [], []
    for role, path in (("data.dir", run.data.dir), ("data.eval_dir", run.data.eval_dir)):
        if path is None:
            continue
        try:
            path = _data_path(role, path, workdir, check)
        except _NotChecked as e:
            if check and e.fatal:
                raise ConfigError(f"{run.where(role)}: --check-data: {e}") from None
            notes.append(f"{e}")
            continue
        if storage.isfile(storage.join(path, "index.json")):
            tokenizer = run.data.tokenizer_dir
            if workdir is not None and not (storage.is_remote(tokenizer) or tokenizer.startswith("/")):
                tokenizer = storage.join(workdir, tokenizer)
            check_dataset(path, run, role, tokenizer_dir=tokenizer)
            checked.append(path)
        elif role == "data.eval_dir":
            continue  # train runs without held-out data when the directory is not there (train.py)
        elif run.data.corpus:
            notes.append(f"{path} does not exist yet; train builds it from data.corpus at train.seq_len")
        elif check:
            raise ConfigError(f"{run.where(role)}: data.dir {path} does not exist (--check-data)")
        else:
            notes.append(f"data.dir {path} does not exist")
    parts = (["checked " + ", ".join(checked)] if checked else []) + [f"not checked ({note})" for note in notes]
    return "; ".join(parts) or "no data configured"


_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def sequence_gathers(hlo_text: str, seq_len: int) -> dict:
    """{"count", "bytes"}: all-gathers (sync or async) in an HLO module's text whose result has a dimension
    of `seq_len` (per-chip result bytes summed). Weight gathers never have one (no weight dimension is a
    sequence length)."""
    count = total = 0
    for line in hlo_text.splitlines():
        lhs, sep, rhs = line.partition(" = ")
        if not sep or not re.search(r"\ball-gather(-start)?\(", rhs):
            continue
        shapes = _SHAPE.findall(rhs.split(" all-gather")[0])
        if not shapes:
            continue
        dtype, dims = shapes[-1]  # an async start returns (operand, result): the result is last
        sizes = [int(d) for d in dims.split(",") if d]
        if seq_len in sizes:
            count += 1
            n = _BYTES.get(dtype, 4)
            for d in sizes:
                n *= d
            total += n
    return {"count": count, "bytes": total}


def _compile_with_gathers(jitted, args, hbm: int, seq_len: int) -> dict:
    """`compile_and_report`, plus the sequence all-gathers of the compiled program (module docstring)."""
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as e:  # JaxRuntimeError (libtpu refuses a program that cannot fit)
        report = exhausted_report(e, args, hbm)
        if report is None:
            raise
        return report
    return memory_report(compiled, hbm) | {"context_all_gathers": sequence_gathers(compiled.as_text(), seq_len)}


def compile_train(tree: dict, topology: str, *, workdir: str | None = None, check_data: bool = False) -> dict:
    """Compiles the train step of run config `tree` for `topology` (e.g. "v5p:4x4x4"); returns the
    memory report plus the workload's shape. `workdir`: the run's (its data is checked as train would);
    `check_data`: read remote data too, and refuse data that is missing (module docstring)."""
    run = load(tree)
    devices = tpu_devices(topology)
    mesh = make_mesh(run.mesh, devices=devices)
    check_run(run, mesh)
    data = _check_data(run, workdir, check_data)
    ts = steps_lib.setup(run, mesh)
    train_step = steps_lib.make_train_step(ts)
    args = (steps_lib.abstract_state(ts), steps_lib.abstract_batch(ts))
    with jax.set_mesh(ts.mesh):
        if context_size(ts.mesh) == 1:
            report = compile_and_report(train_step, args, hbm_bytes(devices[0]))
        else:
            report = _compile_with_gathers(train_step, args, hbm_bytes(devices[0]), run.train.seq_len)
    t = run.train
    return {"mode": "train", "topology": topology, "devices": len(devices),
            "device_kind": devices[0].device_kind, "mesh": dict(ts.mesh.shape),
            "global_batch_size": t.global_batch_size, "seq_len": t.seq_len, "microbatches": t.microbatches,
            "params": run.model.num_params(), "dtype": run.model.dtype, "param_dtype": run.model.param_dtype,
            "remat": run.model.remat, "attention_impl": run.model.attention_impl,
            "flops_per_step": train_flops_per_step(run.model, t.global_batch_size, t.seq_len), "data": data,
            **report}
