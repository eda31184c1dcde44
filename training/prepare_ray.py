"""`prepare-data --engine ray`: the same work units as on one machine, run as Ray tasks on a cluster.

Inside: `run_ray(job, todo, work_dir, on_done, num_cpus=None)`.

Why Ray (and not Apache Beam): the job is a bag of independent units, each a pure function
`training.prepare.run_unit(job, unit, work_dir)` that writes its own shards and marker; no shuffle, no
grouping. Ray runs exactly that (one task per unit, one CPU each, retried by Ray if a node dies) on a
laptop (`ray.init()` starts a local cluster), a VM, or a cluster on GKE (KubeRay) / VMs (`ray up`), and
it installs next to this project's pins without changing any (apache-beam 2.77 would downgrade pyarrow
and protobuf). The driver stays the one machine running `normistral prepare-data`: it plans, skips
committed units (resume works as locally), and writes index.json last. Output must be on storage every
node sees (gs://) when the cluster has more than one machine; each node needs this package installed
(`pip install normistral-jax[ray]`, or the cluster image).

The cluster is the one `ray.init()` finds: `RAY_ADDRESS` (e.g. `ray://head:10001`) or an already
started local one; without either, Ray starts a local cluster with `num_cpus` CPUs (default: all).
"""

from __future__ import annotations

import os
from collections.abc import Callable


def run_ray(job: dict, todo: list[int], work_dir: str, on_done: Callable[[int, dict], None], *,
            num_cpus: int | None = None) -> None:
    try:
        import ray
    except ImportError:
        from training.documents import DataError

        raise DataError("--engine ray needs Ray: pip install 'normistral-jax[ray]'") from None
    from training.prepare import run_unit

    started = False
    if not ray.is_initialized():
        kwargs = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": num_cpus, "include_dashboard": False}
        ray.init(log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, **kwargs)
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=3)(run_unit)
        job_ref = ray.put(job)
        pending = {task.remote(job_ref, i, work_dir): i for i in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    marker = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # a bad record: the worker's one-line DataError
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, ValueError):
                        raise type(cause)(*cause.args) from None
                    raise
                on_done(i, marker)
    finally:
        if started:
            ray.shutdown()
