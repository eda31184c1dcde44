"""Helpers for tests that run `normistral train` as real processes on localhost: one process with 8 CPU
devices, or 2 processes with 4 each (`--coordinator localhost:PORT --num-processes 2 --process-id I`;
collectives between them go through gloo). Used by tests/test_multihost.py and tests/test_multihost_context.py."""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "tiny-cpu.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cpu_env(devices: int, **extra) -> dict:
    """The environment of a CLI process with `devices` CPU devices (no inherited XLA flags or test faults)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NORMISTRAL_FAULTS")}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), **extra)
    return env


def train_cmd(workdir, overrides, config=CONFIG):
    cmd = [sys.executable, "-m", "normistral", "train", "--config", config, "--workdir", workdir]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def train_one(workdir, overrides, data, *, timeout=300) -> subprocess.CompletedProcess:
    """`normistral train` as one process over 8 devices; asserts it exits 0."""
    proc = subprocess.run(train_cmd(workdir, overrides + data), env=cpu_env(8), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_two(workdir, overrides, data, *, faults=(None, None), heartbeat=30, wait=True, timeout=300):
    """`normistral train` as 2 processes x 4 devices; with `wait`, asserts both exit 0 and returns the
    processes with their (stdout, stderr) in `outputs`, else returns the running processes."""
    port = free_port()
    procs = []
    for pid in (0, 1):
        cmd = train_cmd(workdir, overrides + data) + [
            "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid),
            "--heartbeat-timeout", str(heartbeat)]
        extra = {"NORMISTRAL_FAULTS": faults[pid]} if faults[pid] else {}
        procs.append(subprocess.Popen(cmd, env=cpu_env(4, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=REPO))
    if not wait:
        return procs
    try:
        for p in procs:
            p.outputs = p.communicate(timeout=timeout)
    finally:
        for p in procs:  # one that failed or hung must not outlive the test
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p in procs:
        assert p.returncode == 0, p.outputs[1][-3000:]
    return procs


def losses(workdir) -> dict:
    """step -> loss from the run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}
