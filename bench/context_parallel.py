"""Context parallelism on this machine: a 32K-token forward + backward of the 64M config on 8 simulated CPU
devices, context 8 against context 1 (batch 1: only context can split it).

What it measures: the compiler's per-device temporary bytes (`memory_analysis()` of the compiled
loss-and-gradients program, the same one `train` runs: training/step.py's `make_loss_and_grads`, chunked
loss, `remat` as given) for each layout, and, unless `--compile-only`, runs both and compares the loss and
every gradient (the context 8 run gets its batch in the balanced order, as `train` gives it). The target:
temporaries fall >= 3x and the outputs are equal (loss within 1e-6 relative, gradients within 1e-5
relative to their largest entry). The context 1 program runs on one of the 8 devices (a batch of 1 cannot be
split over data or fsdp). One JSON line per layout, then a summary line.

Run: `python bench/context_parallel.py` (compile ~1 min, each run several minutes on 2 shared cores);
`--length 8192` for a quick look, `--compile-only` for the memory figures alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

from jaxmodel.context_parallel import context_size  # noqa: E402
from jaxmodel.sharding import make_mesh  # noqa: E402
from training import config as train_config  # noqa: E402
from training import step as steps_lib  # noqa: E402


def _run_config(length: int, remat: str, impl: str):
    tree = {"_path": "bench", "model": {"preset": "bench_64m", "dtype": "float32", "param_dtype": "float32",
                                        "attention_impl": impl, "remat": remat},
            "train": {"steps": 1, "global_batch_size": 1, "seq_len": length, "loss_chunk": 2048}}
    return train_config.load(tree)


def _batch(length: int, vocab: int) -> dict:
    """One row of 5 packed documents of uneven lengths (they cross the context shards' boundaries)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(16, vocab, size=(1, length + 1)).astype(np.int32)
    cuts = np.sort(rng.choice(np.arange(1, length), size=4, replace=False))
    seg = np.searchsorted(cuts, np.arange(length), side="right")[None].astype(np.int32) + 1
    starts = np.concatenate([[0], cuts])
    pos = (np.arange(length) - starts[seg[0] - 1])[None].astype(np.int32)
    loss_mask = (np.roll(seg, -1, axis=1) == seg).astype(np.float32)
    loss_mask[:, -1] = 0
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": seg, "positions": pos,
            "loss_mask": loss_mask}


def measure(run, shape, devices, batch, execute: bool) -> tuple[dict, tuple | None]:
    ts = steps_lib.setup(run, make_mesh(shape, devices=devices))
    fn = jax.jit(steps_lib.make_loss_and_grads(ts))
    with jax.set_mesh(ts.mesh):
        params = steps_lib.init_state(ts)["params"]
        arrays = steps_lib.put_batch(ts, batch)
        key = jax.random.key(0)
        started = time.perf_counter()
        compiled = fn.lower(params, arrays, key).compile()
        compile_s = time.perf_counter() - started
        mem = compiled.memory_analysis()
        report = {"context": context_size(ts.mesh), "devices": len(devices), "tokens": run.train.seq_len,
                  "remat": run.model.remat, "attention_impl": run.model.attention_impl,
                  "temp_bytes_per_device": int(mem.temp_size_in_bytes),
                  "argument_bytes_per_device": int(mem.argument_size_in_bytes),
                  "output_bytes_per_device": int(mem.output_size_in_bytes), "compile_s": round(compile_s, 1)}
        if not execute:
            return report, None
        started = time.perf_counter()
        loss, _, grads, _ = jax.block_until_ready(compiled(params, arrays, key))
        report["step_s"] = round(time.perf_counter() - started, 1)
    return report, (float(loss), jax.device_get(grads))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_with_no_batch_dims"])
    parser.add_argument("--attention-impl", default="flash", choices=["flash", "xla"])
    parser.add_argument("--compile-only", action="store_true")
    args = parser.parse_args(argv)
    run = _run_config(args.length, args.remat, args.attention_impl)
    batch = _batch(args.length, run.model.vocab_size)
    devices = jax.devices()
    single, ref = measure(run, (1, 1, 1, 1), devices[:1], batch, not args.compile_only)
    print(json.dumps(single), flush=True)
    split, got = measure(run, (1, 1, 1, 8), devices, batch, not args.compile_only)
    print(json.dumps(split), flush=True)
    ratio = single["temp_bytes_per_device"] / split["temp_bytes_per_device"]
    summary = {"temp_bytes_ratio": round(ratio, 2), "target": ">= 3x", "met": ratio >= 3}
    if ref is not None:
        loss_rel = abs(got[0] - ref[0]) / abs(ref[0])
        grad_rel = max(float(np.max(np.abs(g - e)) / max(np.max(np.abs(e)), 1e-30))
                       for g, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])))
        equal = loss_rel <= 1e-6 and grad_rel <= 1e-5
        summary |= {"loss": ref[0], "loss_rel_diff": loss_rel, "max_grad_rel_diff": grad_rel, "outputs_equal": equal}
        summary["met"] = summary["met"] and equal
    print(json.dumps(summary), flush=True)
    return 0 if summary["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
