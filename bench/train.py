"""Training throughput: our jitted train step vs a PyTorch AdamW step of transformers' model, same run.

64M config (4 layers, hidden 512, MLP 1536, 8 heads, 2 KV heads, head_dim 64, vocab 51200), batch 4 x 512
tokens, float32, the same initial weights in both. One step = forward + masked cross entropy + backward +
global-norm clipping (1.0) + AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1).
- ours: `training.step.make_train_step` exactly as `normistral train` runs it (chunked loss with its
  recompute, decay mask, donated state), one CPU device, `xla` attention;
- PyTorch: transformers `MistralForCausalLM` (default sdpa attention), full logits, `F.cross_entropy`,
  `clip_grad_norm_`, `torch.optim.AdamW` (weight decay on every parameter), with as many threads as cores.
Steps alternate between the two (ours, theirs, ours, ...) after two warm-up steps each; medians of
`--repeats` timings each (and the minima). MFU: the FLOPs of training/metrics.py (6 P tokens + causal
attention) per second, divided by this CPU's float32 matmul peak measured here (a 2048^3 `jnp.matmul`,
best of several, before and after the steps).

Run: `python bench/train.py` (prints one JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import bench_checkpoint, machine, matmul_rate  # noqa: E402

from jaxmodel.config import MistralConfig  # noqa: E402
from jaxmodel.sharding import make_mesh  # noqa: E402
from training import config as train_config  # noqa: E402
from training import step as steps_lib  # noqa: E402
from training.metrics import train_flops_per_step  # noqa: E402
from training.train import initial_state  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul on this CPU (best of `repeats`)."""
    return matmul_rate(n, n, n, repeats=repeats)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--loss-chunk", type=int, default=2048, help="train.loss_chunk (default: the trainer's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "normistral-bench-64m"))
    args = parser.parse_args()
    path = bench_checkpoint(args.checkpoint)
    config = MistralConfig.bench_64m()
    b, t = args.batch, args.length
    rng = np.random.default_rng(0)
    ids = rng.integers(16, config.vocab_size, size=(b, t + 1))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((b, t), np.int32),
             "positions": np.broadcast_to(np.arange(t), (b, t)), "loss_mask": np.ones((b, t), np.float32)}
    tokens = b * t
    opt = {"learning_rate": 1e-4, "schedule": "constant", "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
           "clip_norm": 1.0}

    peak_before = matmul_peak()

    # -- ours ---------------------------------------------------------------------------------------------
    tree = {"_path": "bench.yaml", "model": {"init_from": path, "dtype": "float32", "attention_impl": "xla"},
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
            "train": {"steps": 1000, "global_batch_size": b, "seq_len": t, "loss_chunk": args.loss_chunk},
            "optimizer": opt}
    run = train_config.load(tree)
    ts = steps_lib.setup(run, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    state = initial_state(ts, run)
    train_step = steps_lib.make_train_step(ts)
    jbatch = steps_lib.put_batch(ts, batch)
    holder = {"state": state}

    def jax_step():
        holder["state"], metrics = train_step(holder["state"], jbatch)
        jax.block_until_ready(metrics)


    # -- PyTorch ------------------------------------------------------------------------------------------
    torch.set_num_threads(os.cpu_count())
    model = transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["learning_rate"], betas=(opt["b1"], opt["b2"]),
                                  eps=opt["eps"], weight_decay=opt["weight_decay"])
    tids, ttargets = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["targets"])

    def torch_step():
        logits = model(tids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), ttargets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt["clip_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Interleaved (ours, theirs, ours, ...): this shared machine's speed drifts by 2x within minutes, so
    # back-to-back blocks would compare two different machines. Medians of the paired timings.
    with jax.set_mesh(ts.mesh):
        for _ in range(2):  # warm-up: compile, first-touch allocations
            jax_step(), torch_step()
        jax_times, torch_times = [], []
        for _ in range(args.repeats):
            jax_times.append(_timed(jax_step))
            torch_times.append(_timed(torch_step))
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    peak = max(peak_before, matmul_peak())  # the machine's speed drifts: the higher one, a conservative MFU
    flops = train_flops_per_step(config, b, t)
    result = {"bench": "train", "machine": machine(), "config": "bench_64m", "batch": b, "length": t,
              "dtype": "float32", "loss_chunk": args.loss_chunk,
              "jax_tokens_per_s": tokens / jax_s, "torch_tokens_per_s": tokens / torch_s, "ratio": torch_s / jax_s,
              "jax_step_s": jax_s, "torch_step_s": torch_s, "jax_min_step_s": min(jax_times),
              "torch_min_step_s": min(torch_times), "ratio_of_minima": min(torch_times) / min(jax_times),
              "repeats": args.repeats, "flops_per_step": flops,
              "cpu_matmul_peak_flops": peak, "jax_mfu": flops / jax_s / peak, "torch_mfu": flops / torch_s / peak,
              "torch_attention": model.config._attn_implementation, "torch_threads": torch.get_num_threads()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
