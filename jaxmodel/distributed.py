"""Joining a multi-process JAX run (`jax.distributed`): TPU pods, GPU clusters, and localhost tests.

Inside: `DistributedArgs` (the three CLI flags), `detected_cluster()`, `initialize(args)`, `is_primary()`.

When it initializes:
- explicitly, when `--coordinator HOST:PORT --num-processes N --process-id I` are given (GPU clusters,
  CPU processes on one machine for tests);
- automatically whenever JAX's own cluster detection (`jax._src.clusters`: GCE and GKE TPU VMs, Slurm,
  Open MPI, Kubernetes, ...) finds an environment of more than one process; then
  `jax.distributed.initialize()` is called with no arguments and JAX fills in the coordinator, the
  process count and this process's id itself. `detected_cluster` asks the same `ClusterEnv` classes, in
  JAX's order, that `initialize()` will ask: nothing of the detection is re-implemented here;
- never otherwise (one process: nothing to join).
On the CPU backend the cross-process collectives use gloo (other backends ignore the setting).

It must run before anything touches a JAX backend, so the CLI calls it first.

Failure behaviour: every process sends heartbeats to the coordination service; when one stops (a
crash, a kill, a preempted host) the others are terminated by JAX with "the JAX distributed service
detected fatal errors" after `heartbeat_timeout` seconds instead of hanging in a collective. A restart of
all processes resumes from the last complete checkpoint (the training loop's job).
"""

from __future__ import annotations

import dataclasses

import jax


class DistributedError(ValueError):
    """Inconsistent distributed flags (the message names the flag)."""


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout: int = 30

    def validate(self) -> None:
        given = [self.coordinator is not None, self.num_processes is not None, self.process_id is not None]
        if any(given) and not all(given):
            raise DistributedError("--coordinator, --num-processes and --process-id go together")
        if self.coordinator is None:
            return
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"--coordinator {self.coordinator!r}: expected HOST:PORT")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise DistributedError(
                f"--process-id {self.process_id} must be in [0, --num-processes {self.num_processes})")


def detected_cluster() -> tuple[str, int] | None:
    """(name, process count) of the cluster environment JAX's auto-detection would use, or None.

    The first present environment of `ClusterEnv`'s registry that is not opt-in (mpi4py is), the
    choice `jax.distributed.initialize()` makes when it is given no arguments."""
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or not env.is_env_present():
            continue
        return env.name, int(env.get_process_count())
    return None


def initialize(args: DistributedArgs | None = None) -> bool:
    """Joins the distributed run if there is one; returns whether this is a multi-process run."""
    args = args or DistributedArgs()
    args.validate()
    if args.coordinator is not None:
        if args.num_processes == 1:
            return False
        # Cross-process collectives of the CPU backend (tests, CPU clusters); other backends ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout)
        return True
    found = detected_cluster()
    if found is None or found[1] <= 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(heartbeat_timeout_seconds=args.heartbeat_timeout)
    return True


def is_primary() -> bool:
    """Process 0 writes logs, metrics and exports; every process joins collective saves."""
    return jax.process_index() == 0
