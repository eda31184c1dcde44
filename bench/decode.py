"""Generation throughput: `inference.generate` vs transformers' `generate` (KV cache), same weights, same run.

64M config (4 layers, hidden 512, MLP 1536, 8 heads, 2 KV heads, head_dim 64, vocab 51200), batch 8, 128-token
prompts, 64 new tokens, greedy, no stop token (every row produces all 64), float32. Both sides are timed end to
end (tokenize-free: ids in, new ids out; prefill included); tokens/s counts new tokens. PyTorch runs under
no_grad with transformers' default attention (sdpa) and its dynamic KV cache, timed with 1 thread and with
as many threads as cores (the faster counts: OpenMP threads spin badly on a shared, loaded machine).

Also: how close decoding comes to this machine's memory-bandwidth floor. Each decode step must read every
weight except the embedding table (8 rows of it) plus the KV cache it attends over; bandwidth is measured
in the same run with a large numpy copy (bytes read + bytes written per second). floor = bytes per step /
bandwidth; the measured step time is (generation - prefill) / 63, prefill being timed as a 1-token generation.
Run: `python bench/decode.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import bench_checkpoint, machine, median_seconds  # noqa: E402

from inference import generate  # noqa: E402
from jaxmodel import from_pretrained  # noqa: E402
from jaxmodel.config import MistralConfig  # noqa: E402


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes moved per second (read + write) by a large numpy copy: the practical DRAM bandwidth."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    seconds = median_seconds(lambda: np.copyto(dst, src), warmup=1, repeats=5)
    return 2 * nbytes / seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "normistral-bench-64m"))
    args = parser.parse_args()
    path = bench_checkpoint(args.checkpoint)
    config = MistralConfig.bench_64m()
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(args.batch, args.prompt))
    new_tokens = args.batch * args.new

    model = from_pretrained(path, progress=False)
    t0 = time.perf_counter()
    ours = generate(model, ids, max_new_tokens=args.new)
    compile_s = time.perf_counter() - t0
    jax_s = median_seconds(lambda: generate(model, ids, max_new_tokens=args.new), warmup=1, repeats=args.repeats)
    prefill_s = median_seconds(lambda: generate(model, ids, max_new_tokens=1), warmup=1, repeats=args.repeats)

    ref = transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # no stop token: all rows produce every token
    tids = torch.as_tensor(ids)

    def torch_generate():
        with torch.no_grad():
            return ref.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=args.new,
                                do_sample=False, pad_token_id=config.pad_token_id)

    theirs = torch_generate()[:, args.prompt:].numpy()
    # PyTorch's OpenMP threads spin at barriers: on a shared machine all-cores can be many times slower than
    # one thread. Both are timed and the faster counts.
    torch_times = {}
    for threads in sorted({1, os.cpu_count()}):
        torch.set_num_threads(threads)
        torch_times[threads] = median_seconds(torch_generate, warmup=1, repeats=args.repeats)
    torch_threads = min(torch_times, key=torch_times.get)
    torch_s = torch_times[torch_threads]

    bandwidth = copy_bandwidth()
    d, v = config.hidden_size, config.vocab_size
    weight_bytes = (config.num_params() - v * d) * 4 + args.batch * d * 4  # all but the embedding table
    cache_len = args.prompt + args.new  # xla decode attention reads the whole preallocated cache
    cache_bytes = (2 * config.num_hidden_layers * args.batch * config.num_key_value_heads * cache_len
                   * config.head_dim * 4)
    step_s = (jax_s - prefill_s) / (args.new - 1)
    floor_s = (weight_bytes + cache_bytes) / bandwidth
    result = {
        "bench": "decode", "machine": machine(), "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new,
        "dtype": "float32",
        "jax_tokens_per_s": round(new_tokens / jax_s, 1), "torch_tokens_per_s": round(new_tokens / torch_s, 1),
        "ratio": round(torch_s / jax_s, 2), "jax_seconds": round(jax_s, 3), "torch_seconds": round(torch_s, 3),
        "jax_compile_seconds": round(compile_s, 1), "same_tokens_fraction": float((ours == theirs).mean()),
        "torch_attention": ref.config._attn_implementation, "torch_threads": torch_threads,
        "torch_seconds_by_threads": {str(k): round(t, 3) for k, t in torch_times.items()},
        "jax_prefill_seconds": round(prefill_s, 4), "jax_decode_step_ms": round(step_s * 1e3, 2),
        "bytes_per_decode_step": int(weight_bytes + cache_bytes), "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "bandwidth_floor_step_ms": round(floor_s * 1e3, 2), "fraction_of_floor": round(floor_s / step_s, 2),
        "jax_devices": str(jax.devices()[0].platform),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
