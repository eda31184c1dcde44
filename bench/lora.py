"""LoRA training throughput and host memory: ours (LoRA), ours (full fine-tuning), PEFT + PyTorch.

64M config (bench/common.py's bench_checkpoint, float32), batch 4 x 512 tokens, the same batches in all three.
LoRA: rank 16, alpha 32, no dropout, on all seven projections (q k v o gate up down). One step = forward +
masked cross entropy + backward + AdamW (lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.0, no clipping).
- ours LoRA: `training.step.make_train_step` as `normistral train` runs it with a `lora:` section (the
  optimizer over the adapters only, the frozen base passed through), one CPU device, `xla` attention;
- ours full: the same step without `lora:` (every parameter trained, Adam moments for all);
- PEFT: `peft.get_peft_model` on transformers' `MistralForCausalLM` (sdpa attention), `torch.optim.AdamW`
  over the trainable parameters, as many threads as cores.
Each runs in its own subprocess, so its peak RSS (`ru_maxrss`: weights, optimizer state, activations, compile)
is its own. Two warm-up steps, then medians of `--repeats` timed steps. The processes run one after another,
so on a shared machine whose speed drifts the comparison is only as good as the machine was steady.

Run: `python bench/lora.py` (prints one JSON line: each mode's tokens_per_s, step_s, trained_params and
peak_rss_mb; lora_vs_peft_tokens_per_s, lora_vs_full_tokens_per_s, lora_vs_full_peak_rss; and targets_met,
the acceptance's two targets: LoRA at least 1.2x PEFT + PyTorch tokens/s, less peak memory than full).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import bench_checkpoint, machine  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPT = {"learning_rate": 1e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.0}
MODES = ("ours-lora", "ours-full", "peft")


def _batch(b: int, t: int, vocab: int) -> dict:
    import numpy as np

    ids = np.random.default_rng(0).integers(16, vocab, size=(b, t + 1))
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t), (b, t)), "loss_mask": np.ones((b, t), np.float32)}


def _ours(path: str, lora: bool, args) -> tuple:
    """(step function, trained parameter count)."""
    import jax

    from jaxmodel.sharding import make_mesh
    from training import config as train_config
    from training import step as steps_lib
    from training.train import initial_state

    tree = {"_path": "bench.yaml", "model": {"init_from": path, "dtype": "float32", "attention_impl": "xla"},
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
            "train": {"steps": 1000, "global_batch_size": args.batch, "seq_len": args.length},
            "optimizer": {**OPT, "schedule": "constant", "clip_norm": None}}
    if lora:
        tree["lora"] = {"rank": args.rank, "alpha": 2 * args.rank, "target_modules": TARGETS}
    run = train_config.load(tree)
    ts = steps_lib.setup(run, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    holder = {"state": initial_state(ts, run)}
    train_step = steps_lib.make_train_step(ts)
    jbatch = steps_lib.put_batch(ts, _batch(args.batch, args.length, run.model.vocab_size))

    def step():
        with jax.set_mesh(ts.mesh):
            holder["state"], metrics = train_step(holder["state"], jbatch)
        jax.block_until_ready(metrics)

    return step, sum(x.size for x in jax.tree.leaves(ts.abstract_params))


def _peft(path: str, args) -> tuple:
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                       target_modules=TARGETS)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=OPT["learning_rate"], betas=(OPT["b1"], OPT["b2"]), eps=OPT["eps"],
                                  weight_decay=OPT["weight_decay"])
    batch = _batch(args.batch, args.length, model.config.vocab_size)
    ids, targets = torch.as_tensor(batch["input_ids"]), torch.as_tensor(batch["targets"])

    def step():
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def child(args) -> None:
    """One mode in this process: prints {tokens_per_s, step_s, peak_rss_mb, trained_params}."""
    path = bench_checkpoint(args.checkpoint)
    step, trained = _peft(path, args) if args.mode == "peft" else _ours(path, args.mode == "ours-lora", args)
    for _ in range(2):  # warm-up: compile, first-touch allocations
        step()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    print(json.dumps({"tokens_per_s": args.batch * args.length / median, "step_s": median,
                      "min_step_s": min(times), "trained_params": trained,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main():
    parser = argparse.ArgumentParser(description="LoRA training tokens/s and peak host memory: ours (LoRA), ours "
                                     "(full fine-tuning) and PEFT + PyTorch on the same batches; one JSON line.")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    parser.add_argument("--length", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank, alpha = 2 x rank (default 16)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per mode, after 2 warm-up steps")
    parser.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "normistral-bench-64m"),
                        help="where the 64M float32 checkpoint is made (reused when there)")
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process (what the parent spawns)")
    args = parser.parse_args()
    if args.mode:
        return child(args)
    bench_checkpoint(args.checkpoint)  # made once, before any timed process
    result = {"bench": "lora", "machine": machine(), "config": "bench_64m", "batch": args.batch,
              "length": args.length, "rank": args.rank, "dtype": "float32", "repeats": args.repeats}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--batch", str(args.batch), "--length",
               str(args.length), "--rank", str(args.rank), "--repeats", str(args.repeats), "--checkpoint",
               args.checkpoint]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        result[mode] = json.loads(out.strip().splitlines()[-1])
    lora, full, torch_peft = result["ours-lora"], result["ours-full"], result["peft"]
    # The acceptance's two targets: LoRA >= 1.2x PEFT + PyTorch tokens/s; less host memory than full fine-tuning.
    result["lora_vs_peft_tokens_per_s"] = lora["tokens_per_s"] / torch_peft["tokens_per_s"]
    result["lora_vs_full_tokens_per_s"] = lora["tokens_per_s"] / full["tokens_per_s"]
    result["lora_vs_full_peak_rss"] = lora["peak_rss_mb"] / full["peak_rss_mb"]
    result["targets_met"] = {"lora_at_least_1.2x_peft_tokens_per_s": result["lora_vs_peft_tokens_per_s"] >= 1.2,
                             "lora_less_peak_rss_than_full": lora["peak_rss_mb"] < full["peak_rss_mb"]}
    print(json.dumps(result))

if __name__ == "__main__":
    main()
