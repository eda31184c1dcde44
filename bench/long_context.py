"""Long-context training step: time and peak host memory of forward + backward with `flash` vs `xla` attention.

A small model (2 layers, hidden 256, MLP 688, 4 heads, 2 KV heads, head_dim 64, vocab 1024, float32), batch 1,
`jax.value_and_grad` of the next-token cross-entropy over all parameters, at 1K, 4K, 16K and 32K tokens:
flash as configured (remat "none": every layer's activations are kept for the backward pass) and with
remat "full" (each layer is recomputed in the backward pass), xla with "none". Each (length, impl, remat)
runs in a fresh child process, so its peak RSS (`os.wait4` ru_maxrss) is its own; the child's address space
is capped (`RLIMIT_AS`, default 10 GiB) so a run that would exhaust the machine fails instead. `xla` runs
whose [B, N, T, S] float32 score matrix alone exceeds the cap are not started; their line gives that size.
The acceptance target: flash at 32K under 3 GB peak RSS. One JSON line per run.
Run: `python bench/long_context.py` (about 10 minutes on 2 cores; `--lengths 32768 --runs flash:full` for one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

GIB = 1 << 30
HEADS = 4


def config(impl: str, remat: str = "none"):
    from jaxmodel.config import MistralConfig

    return MistralConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=2, head_dim=64, attention_impl=impl,
                         remat=remat)


def child(impl: str, remat: str, length: int, steps: int) -> dict:
    """One model at `length` tokens: compile + first step, then `steps - 1` more (reported as the median)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxmodel import init_model

    graphdef, params = nnx.split(init_model(config(impl, remat), seed=0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 1024, size=(1, length)), jnp.int32)

    def loss(params, ids):
        logits = nnx.merge(graphdef, params)(ids)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        value, grads = step(params, ids)
        jax.block_until_ready(grads)
        times.append(time.perf_counter() - t)
    return {"first_step_s": times[0], "step_s": float(np.median(times[1:])) if steps > 1 else None,
            "loss": float(value)}


def run_in_child(impl: str, remat: str, length: int, *, steps: int = 2, limit_bytes: int = 10 * GIB) -> dict:
    """Runs `child` in a fresh interpreter under an address-space cap; adds peak RSS and the exit status."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, remat, str(length), "--steps", str(steps)]
    t = time.perf_counter()
    # Output goes to files, not pipes: a chatty child cannot block, and wait4 (not communicate) reaps it.
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        # preexec_fn is safe here: the parent runs no threads (it never imports jax).
        proc = subprocess.Popen(cmd, stdout=out_file, stderr=err_file, preexec_fn=cap)  # noqa: PLW1509
        _, status, usage = os.wait4(proc.pid, 0)
        out_file.seek(0), err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    row = {"length": length, "impl": impl, "remat": remat, "wall_s": time.perf_counter() - t,
           "peak_rss_bytes": usage.ru_maxrss * 1024}  # ru_maxrss is KiB on Linux
    if os.waitstatus_to_exitcode(status) == 0:
        row.update(json.loads(out.decode().strip().splitlines()[-1]))
        row["ok"] = True
    else:
        lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
        row.update(ok=False, exit_code=os.waitstatus_to_exitcode(status),
                   error=(lines[-1] if lines else "")[:300])
    return row


def score_matrix_bytes(length: int) -> int:
    return HEADS * length * length * 4  # one layer's [B=1, N, T, S] float32 scores


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--runs", nargs="+", default=["flash:none", "flash:full", "xla:none"],
                        help="IMPL:REMAT pairs")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--limit-gib", type=float, default=10.0, help="RLIMIT_AS of each child")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "REMAT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]), args.steps)))
        return
    limit = int(args.limit_gib * GIB)
    for length in args.lengths:
        for impl, remat in (run.split(":") for run in args.runs):
            scores = score_matrix_bytes(length)
            if impl == "xla" and scores > limit:
                row = {"length": length, "impl": impl, "remat": remat, "ok": False, "skipped": True,
                       "score_matrix_bytes_per_layer": scores,
                       "error": f"not run: one layer's float32 score matrix alone is {scores / GIB:.0f} GiB "
                                f"(> the {args.limit_gib:g} GiB cap)"}
            else:
                row = run_in_child(impl, remat, length, steps=args.steps, limit_bytes=limit)
                row["score_matrix_bytes_per_layer"] = scores
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
