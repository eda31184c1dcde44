"""`prepare-data --engine ray`: the same work units as on one machine, run as Ray tasks on a cluster.

Inside: `check_cluster()` (before any work), `run_ray(job, todo, work_dir, on_done, run_unit=..., num_cpus=None)`.

Why Ray (and not Apache Beam): the job is a bag of independent units, each a pure function
`training.prepare_unit.run_unit(job, unit, work_dir)` that writes its own shards and marker; no shuffle, no
grouping. Ray runs exactly that (one task per unit, one CPU each, retried by Ray if a node dies) on a
laptop (`ray.init()` starts a local cluster), a VM, or a cluster on GKE (KubeRay) / VMs (`ray up`), and
it installs next to this project's pins without changing any (apache-beam 2.77 would downgrade pyarrow
and protobuf). The driver stays the one machine running `normistral prepare-data`: it plans, skips
committed units (resume works as locally), and writes index.json last. Output must be on storage every
node sees (gs://) when the cluster has more than one machine; each node needs this package installed
(`pip install normistral-jax[ray]`, or the cluster image). The unit function is passed in by
training.prepare (this module does not import it back).

The cluster is the one `ray.init()` finds: `RAY_ADDRESS` (`HOST:PORT` of the head's GCS, or
`ray://HOST:10001`) or an already started local one; without either, Ray starts a local cluster with
`num_cpus` CPUs (default: all). An address that does not answer is refused within `CONNECT_TIMEOUT_S`:
`ray.init` itself retries it for minutes (Ray 2.60: 20 attempts of ~35 s, each logged), so `check_cluster`
first opens a TCP connection to it, and `run_ray` caps Ray's own attempts (`RAY_gcs_server_port_wait_time_s`,
unless set) for an address that accepts connections but is not a Ray head.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from training.documents import DataError

CONNECT_TIMEOUT_S = 10  # a TCP connection to RAY_ADDRESS
GCS_ATTEMPTS = "1"  # ray.init's attempts at an address that accepts connections (~40 s in Ray 2.60)
_CLIENT_PORT = 10001  # ray:// without a port


def check_cluster() -> None:
    """Ray is installed and `RAY_ADDRESS`, when it names one, accepts a connection; else one DataError."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise DataError("--engine ray needs Ray: pip install 'normistral-jax[ray]'") from None
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "auto", "local"):  # a local cluster: found or started by ray.init
        return
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise DataError(f"RAY_ADDRESS={address}: cannot reach the Ray cluster ({reason.lower()}); start it, "
                        "fix the address, or unset RAY_ADDRESS for a local cluster") from None


def _host_port(address: str) -> tuple[str, int]:
    scheme, sep, rest = address.partition("://")
    rest = (rest if sep else address).rstrip("/")
    host, colon, port = rest.rpartition(":")
    if not colon and sep and scheme == "ray":
        host, port = rest, str(_CLIENT_PORT)
    if not host or not port.isdigit():
        raise DataError(f"RAY_ADDRESS={address}: expected HOST:PORT (the head's GCS) or ray://HOST[:PORT]")
    return host.strip("[]"), int(port)


def run_ray(job: dict, todo: list[int], work_dir: str, on_done: Callable[[int, dict], None], *,
            run_unit: Callable[[dict, int, str], dict], num_cpus: int | None = None) -> None:
    """Runs `run_unit(job, i, work_dir)` for each i of `todo` as Ray tasks; `on_done(i, marker)` as each ends."""
    import ray

    started = False
    if not ray.is_initialized():
        _init(ray, num_cpus)
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


def _init(ray, num_cpus: int | None) -> None:
    address = os.environ.get("RAY_ADDRESS", "").strip()
    kwargs = {} if address else {"num_cpus": num_cpus, "include_dashboard": False}
    if address:
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", GCS_ATTEMPTS)
    try:
        ray.init(log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, **kwargs)
    except (ConnectionError, RuntimeError) as e:  # no cluster at the address, or not a Ray head
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"RAY_ADDRESS={address or 'auto'}: cannot connect to the Ray cluster ({first})") from None
