"""Joining a multi-process JAX run (`jax.distributed`): TPU pods, GPU clusters, and localhost tests.

Inside: `DistributedArgs` (the three CLI flags), `initialize(args)`, `is_primary()`.

When it initializes:
- explicitly, when `--coordinator HOST:PORT --num-processes N --process-id I` are given (GPU clusters,
  CPU processes on one machine for tests); on CPU the cross-process collectives use gloo;
- automatically on a multi-host Cloud TPU slice (libtpu's worker list names more than one host), where
  `jax.distributed.initialize()` discovers everything itself;
- never otherwise (one process: nothing to join).

It must run before anything touches a JAX backend, so the CLI calls it first.

Failure behaviour: every process sends heartbeats to the coordination service; when one stops (a
crash, a kill, a preempted host) the others are terminated by JAX with "the JAX distributed service
detected fatal errors" after `heartbeat_timeout` seconds instead of hanging in a collective. A restart of
all processes resumes from the last complete checkpoint (the training loop's job).
"""

from __future__ import annotations

import dataclasses
import os

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


def _multi_host_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


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
    if _multi_host_tpu():
        jax.distributed.initialize(heartbeat_timeout_seconds=args.heartbeat_timeout)
        return True
    return False


def is_primary() -> bool:
    """Process 0 writes logs, metrics and exports; every process joins collective saves."""
    return jax.process_index() == 0
