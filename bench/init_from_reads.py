"""Per-process bytes read by `model.init_from` (`convert.from_pretrained(HF_DIR, mesh=...)`) on 1 and on
2 processes.

bench/convert_memory.py's synthetic float32 checkpoint (hidden 1024, MLP 4096, 16/4 heads, vocab 32000;
61 MB per layer) at 8 layers (0.75 GB), loaded onto an FSDP mesh of 8 CPU devices: 1 process x 8 devices,
then 2 processes x 4 devices (jax.distributed on localhost, gloo), as the trainer loads `init_from`. Each
process reports `safetensors_io.bytes_read()` (the tensor bytes it requested from storage) and its own
peak RSS (VmHWM, polled). The claim under test: on 2 processes each reads about half of the checkpoint
(the norms, which no mesh axis splits, are read by both). Run: `python bench/init_from_reads.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402
from convert_memory import vm_hwm, write_synthetic  # noqa: E402

PROBE = """
import json, sys, time
from jaxmodel.distributed import DistributedArgs, initialize
if sys.argv[1] != "-":
    initialize(DistributedArgs(sys.argv[1], 2, int(sys.argv[2])))
import jax
from jaxmodel import safetensors_io
from jaxmodel.convert import from_pretrained
from jaxmodel.sharding import make_mesh
t = time.time()
model = from_pretrained(sys.argv[3], mesh=make_mesh((1, -1, 1)), progress=False)
jax.block_until_ready(jax.tree.leaves(model))
with open(sys.argv[4], "w") as f:
    json.dump({"process": jax.process_index(), "devices": jax.device_count(),
               "bytes_read": safetensors_io.bytes_read(), "seconds": time.time() - t}, f)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(hf: str, work: str, processes: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(8 // processes))
    port = _port()
    procs, outs = [], []
    for pid in range(processes):
        outs.append(os.path.join(work, f"reads-{processes}-{pid}.json"))
        coordinator = f"localhost:{port}" if processes > 1 else "-"
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE, coordinator, str(pid), hf, outs[-1]], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    peaks = [0] * processes
    while any(p.poll() is None for p in procs):
        peaks = [max(peak, vm_hwm(p.pid) or 0) for peak, p in zip(peaks, procs)]
        time.sleep(0.01)
    for p in procs:
        if p.returncode != 0:
            raise SystemExit(f"init_from probe failed: {p.stderr.read().decode()[-2000:]}")
    rows = []
    for out, peak in zip(outs, peaks):
        with open(out) as f:
            rows.append({**json.load(f), "peak_rss_bytes": peak})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="normistral-init-from-bench-")
    try:
        hf = os.path.join(work, "hf")
        size = write_synthetic(hf, args.layers)
        runs = {str(n): _run(hf, work, n) for n in (1, 2)}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for rows in runs.values():
        for r in rows:
            r["read_over_size"] = r["bytes_read"] / size
    print(json.dumps({"bench": "init_from_reads", "machine": machine(), "layers": args.layers,
                      "checkpoint_bytes": size, "runs": runs}))


if __name__ == "__main__":
    main()
