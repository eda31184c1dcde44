"""Ahead-of-time compilation of the real train step for a TPU topology (`normistral compile-check --mode train`).

Inside: `compile_train(tree, topology) -> dict`.

It builds exactly what `run_training` jits (training/step.py: same optimizer, microbatch scan, chunked
loss, donated state), but over abstract inputs: the state comes from `jax.eval_shape` of the model and of
`optimizer.init`, each leaf a ShapeDtypeStruct carrying the NamedSharding the run would give it on a mesh
of the topology's devices (`jaxmodel.aot.tpu_devices`). libtpu compiles it as the pod would, and
`jaxmodel.aot.memory_report` reads the per-chip memory from the executable. Nothing is allocated and no
weights are read (`model.init_from` is not opened; the model section's preset gives the shapes).

Before compiling it runs the checks `normistral train` runs (training/validate.py): the batch and the
model's dimensions against the mesh, and, when the run's data directory can be found (`workdir`, as
`train --workdir` would be given, or an absolute `data.dir`), the data's seq_len, vocabulary and special
ids; so a "fits" verdict describes the program `train` runs.

Must run on the CPU backend with libtpu loadable (the CLI sets JAX_PLATFORMS=cpu before JAX starts).
"""

from __future__ import annotations

import jax

from jaxmodel import storage
from jaxmodel.aot import hbm_bytes, memory_report, tpu_devices
from jaxmodel.config import ConfigError
from jaxmodel.sharding import make_mesh
from training import step as steps_lib
from training.config import load
from training.metrics import train_flops_per_step
from training.validate import check_dataset, check_run


def _check_data(run, workdir: str | None) -> str:
    """What was checked of the run's data (training/validate.py), as the report states it."""
    checked = []
    for role, path in (("data.dir", run.data.dir), ("data.eval_dir", run.data.eval_dir)):
        if path is None:
            continue
        if not (storage.is_remote(path) or path.startswith("/")):
            if workdir is None:
                return f"not checked ({role} {path} is relative to the workdir: pass --workdir)"
            path = storage.join(workdir, path)
        if storage.isfile(storage.join(path, "index.json")):
            tokenizer = run.data.tokenizer_dir
            if workdir is not None and not (storage.is_remote(tokenizer) or tokenizer.startswith("/")):
                tokenizer = storage.join(workdir, tokenizer)
            check_dataset(path, run, role, tokenizer_dir=tokenizer)
            checked.append(path)
        elif role == "data.dir":
            if not run.data.corpus:
                raise ConfigError(f"{run.path}: data.dir {path} does not exist (and data.corpus is not set to "
                                  "build it)")
            return f"not checked ({path} does not exist yet; train builds it from data.corpus at train.seq_len)"
    return "checked " + ", ".join(checked)


def compile_train(tree: dict, topology: str, *, workdir: str | None = None) -> dict:
    """Compiles the train step of run config `tree` for `topology` (e.g. "v5p:4x4x4"); returns the
    memory report plus the workload's shape. `workdir`: the run's (its data is checked as train would)."""
    run = load(tree)
    devices = tpu_devices(topology)
    mesh = make_mesh(run.mesh, devices=devices)
    check_run(run, mesh)
    data = _check_data(run, workdir)
    ts = steps_lib.setup(run, mesh)
    train_step = steps_lib.make_train_step(ts)
    with jax.set_mesh(ts.mesh):
        compiled = train_step.lower(steps_lib.abstract_state(ts), steps_lib.abstract_batch(ts)).compile()
    t = run.train
    return {"mode": "train", "topology": topology, "devices": len(devices),
            "device_kind": devices[0].device_kind, "mesh": dict(ts.mesh.shape),
            "global_batch_size": t.global_batch_size, "seq_len": t.seq_len, "microbatches": t.microbatches,
            "params": run.model.num_params(), "dtype": run.model.dtype, "param_dtype": run.model.param_dtype,
            "remat": run.model.remat, "attention_impl": run.model.attention_impl,
            "flops_per_step": train_flops_per_step(run.model, t.global_batch_size, t.seq_len), "data": data,
            **memory_report(compiled, hbm_bytes(devices[0]))}
