"""Peak host memory of `normistral import-hf` on synthetic checkpoints of growing depth.

Writes float32 Hugging Face checkpoints (hidden 1024, MLP 4096, 16/4 heads, vocab 32000; 61 MB per layer)
of 15 and 60 layers (1.2 GB and 3.9 GB), streaming them to disk tensor by tensor, then runs the real CLI
on each in a child process and polls the child's peak RSS (VmHWM). The claim under test: peak RSS
stays under a quarter of the checkpoint size and does not grow with the number of layers.
Run: `python bench/convert_memory.py` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402

from jaxmodel.config import MistralConfig  # noqa: E402
from jaxmodel.safetensors_io import SafetensorsWriter, shard_plan  # noqa: E402
from jaxmodel.weights import expected_hf_tensors  # noqa: E402


def write_synthetic(path: str, layers: int) -> int:
    """A random float32 checkpoint written one tensor at a time; returns its size in bytes."""
    cfg = MistralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
    )
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    specs = {name: (t.hf_shape, np.dtype(np.float32)) for name, t in expected_hf_tensors(cfg).items()}
    rng, total, weight_map = np.random.default_rng(0), 0, {}
    shards = list(shard_plan(specs, 1 << 30))
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(os.path.join(path, file), {n: specs[n] for n in names}) as w:
            for name in names:
                w.write(name, rng.standard_normal(specs[name][0], dtype=np.float32) * 0.02)
                weight_map[name] = file
        total += os.path.getsize(os.path.join(path, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def peak_rss_of(cmd: list[str]) -> tuple[int, float]:
    """The child's own peak RSS (VmHWM, polled until it exits) and its wall time.

    Not `ru_maxrss` from wait4: Linux carries the RSS the forked child had before exec (a copy of this
    parent, which just wrote gigabytes) into ru_maxrss. VmHWM is the high-water mark of the program
    itself; it only grows, so the last reading before exit is the peak (up to the last 10 ms)."""
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid) or 0)
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return peak, time.time() - t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[15, 60])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="normistral-convert-bench-")
    normistral = [sys.executable, "-m", "normistral"]
    # What any JAX program pays before converting a byte: imports plus the XLA CPU client.
    baseline, _ = peak_rss_of([sys.executable, "-c", "import jax, orbax.checkpoint, jaxmodel.convert; jax.devices()"])
    rows = []
    try:
        for layers in args.layers:
            hf, out = os.path.join(work, f"hf-{layers}"), os.path.join(work, f"orbax-{layers}")
            size = write_synthetic(hf, layers)
            rss, seconds = peak_rss_of([*normistral, "import-hf", hf, out])
            rows.append(
                {
                    "layers": layers,
                    "checkpoint_bytes": size,
                    "peak_rss_bytes": rss,
                    "rss_over_size": rss / size,
                    "seconds": seconds,
                }
            )
            shutil.rmtree(hf), shutil.rmtree(out)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {"bench": "convert_memory", "machine": machine(), "import_baseline_rss_bytes": baseline, "runs": rows}
        )
    )


if __name__ == "__main__":
    main()
