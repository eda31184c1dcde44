"""Data loader throughput: `PackedDataset` rows/s for 32K-token rows, from a GCS API (the emulator on
localhost, or a real bucket) vs local disk, next to the rows/s one host of the 11B v5p-64 run consumes.

The data: a PackedDataset directory of `--rows` random rows of 32,768 tokens (int32 tokens, segment ids
and positions: 384 KiB per row), in shards of `--shard-rows` rows, written locally and uploaded with
`jaxmodel.storage.upload_dir` into a committed directory. Each timed call is `PackedDataset.batch(step,
...)` for one process's slice (`--local-batch` rows; the 32k-v5p config's 64-row global batch over 16
hosts of 4 chips gives 4 rows per host), on a fresh dataset object per pass so nothing is served from a
cache of ours (the local pass still has the OS page cache: the files were just written). Local and remote
passes alternate; medians of `--repeats` passes of `--steps` steps each.

The demand: `train_flops_per_step` (training/metrics.py) of the 11B model at 64 x 32,768 tokens, over 64
v5p chips at 459 TFLOP/s and an assumed `--mfu` (default 0.4) gives the step time; one host needs
`--local-batch` rows per step. The loader keeps up when its rows/s exceeds that (the Prefetcher then
hides it entirely behind the step).

Run: `python bench/data_loader.py` (starts the emulator, prints one JSON line), or
`python bench/data_loader.py --url gs://BUCKET/bench-data` for a real bucket (credentials as usual).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402

SEQ_LEN = 32768


def write_dataset(path: str, rows: int, shard_rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(path)
    shards = []
    for k, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        entry = {"rows": n}
        arrays = {"tokens": rng.integers(0, 51200, (n, SEQ_LEN), dtype=np.int32),
                  "segment_ids": np.ones((n, SEQ_LEN), np.int32),
                  "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (n, SEQ_LEN))}
        for name, value in arrays.items():
            entry[name] = f"shard-{k:05d}.{name}.npy"
            np.save(os.path.join(path, entry[name]), value)
        shards.append(entry)
    index = {"format": 1, "seq_len": SEQ_LEN, "num_rows": rows, "vocab_size": 51200,
             "tokenizer": {"name": "synthetic", "path": "", "bos_id": 1, "eos_id": 2, "pad_id": 2},
             "sources": [{"name": "synthetic", "path": "", "weight": 1.0, "documents": rows,
                          "tokens": rows * SEQ_LEN, "rows": [0, rows]}], "shards": shards}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)


def start_emulator():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"), "start", "--host",
                             "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
                      FSSPEC_GS_TOKEN="anon", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    import fsspec

    fsspec.filesystem("gs").mkdir("bench")
    return proc, "gs://bench/data"


def rows_per_second(directory: str, steps: int, local_batch: int, hosts: int) -> float:
    from training.data import PackedDataset

    ds = PackedDataset.open(directory)
    t = time.perf_counter()
    for step in range(steps):
        ds.batch(step, global_batch_size=local_batch * hosts, process_index=step % hosts, process_count=hosts)
    return steps * local_batch / (time.perf_counter() - t)


def demand(local_batch: int, mfu: float) -> dict:
    from jaxmodel.config import MistralConfig
    from training.metrics import PEAK_FLOPS, train_flops_per_step

    flops = train_flops_per_step(MistralConfig.normistral_11b_long(), 64, SEQ_LEN)
    step = flops / (64 * PEAK_FLOPS["TPU v5p"] * mfu)
    return {"v5p64_step_s": round(step, 2), "assumed_mfu": mfu, "rows_per_host_per_step": local_batch,
            "needed_rows_per_s_per_host": round(local_batch / step, 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--shard-rows", type=int, default=32)
    p.add_argument("--local-batch", type=int, default=4)
    p.add_argument("--hosts", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--url", help="a gs:// directory to upload to and read from (default: the local emulator)")
    args = p.parse_args()

    from jaxmodel import storage

    proc = None
    if args.url is None:
        proc, remote = start_emulator()
    else:
        remote = args.url
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "data")
            write_dataset(local, args.rows, args.shard_rows)
            t = time.perf_counter()
            with storage.atomic_directory(remote) as out:
                storage.upload_dir(local, out)
            upload_s = time.perf_counter() - t
            runs = {"local": [], "gcs": []}
            for _ in range(args.repeats):
                runs["local"].append(rows_per_second(local, args.steps, args.local_batch, args.hosts))
                runs["gcs"].append(rows_per_second(remote, args.steps, args.local_batch, args.hosts))
        result = {"machine": machine(), "remote": "emulator on localhost" if args.url is None else args.url,
                  "row_bytes": 3 * 4 * SEQ_LEN, "local_batch": args.local_batch, "rows": args.rows,
                  "upload_mb_per_s": round(args.rows * 3 * 4 * SEQ_LEN / upload_s / 1e6, 1),
                  **{f"{k}_rows_per_s": round(statistics.median(v), 1) for k, v in runs.items()},
                  **{f"{k}_rows_per_s_all": [round(x, 1) for x in v] for k, v in runs.items()},
                  **demand(args.local_batch, args.mfu)}
        print(json.dumps(result))
    finally:
        if proc is not None:
            proc.kill()


if __name__ == "__main__":
    main()
