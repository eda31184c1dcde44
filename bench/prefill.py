"""Forward (prefill) throughput: our JAX model vs transformers' PyTorch model, same weights, same run.

64M config (4 layers, hidden 512, MLP 1536, 8 heads, 2 KV heads, head_dim 64, vocab 51200), batch 8 x 128
tokens, float32, full logits. PyTorch runs transformers' default attention (sdpa) under no_grad with
the same thread count JAX uses. Run: `python bench/prefill.py` (or `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import bench_checkpoint, machine, median_seconds  # noqa: E402
from flax import nnx  # noqa: E402

from jaxmodel import from_pretrained  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "normistral-bench-64m"))
    args = parser.parse_args()
    path = bench_checkpoint(args.checkpoint)
    ids = np.random.default_rng(0).integers(0, 51200, size=(args.batch, args.length))
    tokens = ids.size

    model = from_pretrained(path, progress=False)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    jax_s = median_seconds(lambda: forward(state, ids).block_until_ready())

    torch.set_num_threads(os.cpu_count())
    ref = transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tids = torch.as_tensor(ids)

    def torch_forward():
        with torch.no_grad():
            return ref(tids).logits

    torch_s = median_seconds(torch_forward)
    result = {
        "bench": "prefill",
        "machine": machine(),
        "batch": args.batch,
        "length": args.length,
        "jax_tokens_per_s": tokens / jax_s,
        "torch_tokens_per_s": tokens / torch_s,
        "ratio": torch_s / jax_s,
        "torch_attention": ref.config._attn_implementation,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
