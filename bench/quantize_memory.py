"""Peak host memory of `Generator.from_pretrained(..., quantize=...)` on synthetic bfloat16 checkpoints.

Writes bfloat16 Hugging Face checkpoints (hidden 2048, MLP 8192, 16/4 heads, head_dim 128, vocab 32000;
121 MB per layer, the embedding and lm_head 131 MB each) of 8 and 32 layers (1.2 GB and 4.1 GB), one
tensor at a time, then loads each in a child process and polls the child's peak RSS (VmHWM, as
bench/convert_memory.py does):
- `stream`: `Generator.from_pretrained(path, quantize=MODE)`, each tensor quantized as it is read;
- `after`: the previous path, a full bfloat16 load then `quantize_model` (for comparison).
On this CPU machine the "device" is host memory, so the quantized model itself is part of the RSS; the
claim under test is peak RSS <= baseline + quantized model + one layer's bfloat16 size, flat in depth.
Run: `python bench/quantize_memory.py` (add `--modes int8 int4 --layers 8 32`).
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

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402
from convert_memory import vm_hwm  # noqa: E402

from jaxmodel.config import MistralConfig  # noqa: E402
from jaxmodel.safetensors_io import SafetensorsWriter, shard_plan  # noqa: E402
from jaxmodel.weights import expected_hf_tensors  # noqa: E402

CHILD = r"""
import json, sys
import jax.numpy as jnp
from inference import Generator, param_bytes, quantize_model
from jaxmodel import from_pretrained
path, mode, how = sys.argv[1:4]
if how == "stream":
    model = Generator.from_pretrained(path, tokenizer=object(), dtype=jnp.bfloat16, quantize=mode).model
else:
    model = quantize_model(from_pretrained(path, dtype=jnp.bfloat16, progress=False), mode)
print(json.dumps({"param_bytes": param_bytes(model)}))
"""
BASELINE = r"""
import jax, jax.numpy as jnp, numpy as np
from inference import Generator, quantize_model
from inference.quantize import quantize_array
jax.block_until_ready(jax.jit(lambda w: quantize_array(w, (0,), "int4").q)(jnp.ones((256, 256), jnp.bfloat16)))
"""


def config(layers: int) -> MistralConfig:
    return MistralConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=128, torch_dtype="bfloat16")


def write_synthetic(path: str, layers: int) -> int:
    """A random bfloat16 checkpoint written one tensor at a time; returns its size in bytes."""
    cfg = config(layers)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = {name: (t.hf_shape, bf16) for name, t in expected_hf_tensors(cfg).items()}
    rng, total, weight_map = np.random.default_rng(0), 0, {}
    shards = list(shard_plan(specs, 1 << 30))
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(os.path.join(path, file), {n: specs[n] for n in names}) as w:
            for name in names:
                w.write(name, (rng.standard_normal(specs[name][0], dtype=np.float32) * 0.02).astype(bf16))
                weight_map[name] = file
        total += os.path.getsize(os.path.join(path, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def run_child(code: str, *args: str) -> tuple[int, float, dict]:
    """Peak RSS (VmHWM polled until exit), wall time and the JSON the child printed last."""
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid) or 0)
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child failed: {err[-2000:]}")
    lines = [x for x in out.splitlines() if x.startswith("{")]
    return peak, time.time() - t, json.loads(lines[-1]) if lines else {}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--modes", nargs="+", default=["int8", "int4"])
    parser.add_argument("--hows", nargs="+", default=["stream", "after"])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="normistral-quantize-bench-")
    baseline, _, _ = run_child(BASELINE)
    layer_bytes = 2 * (config(2).num_params() - config(1).num_params())
    rows = []
    try:
        for layers in args.layers:
            hf = os.path.join(work, f"hf-{layers}")
            size = write_synthetic(hf, layers)
            for mode in args.modes:
                for how in args.hows:
                    rss, seconds, info = run_child(CHILD, hf, mode, how)
                    bound = baseline + info["param_bytes"] + layer_bytes
                    rows.append({"layers": layers, "checkpoint_bytes": size, "mode": mode, "how": how,
                                 "peak_rss_bytes": rss, "quantized_bytes": info["param_bytes"],
                                 "above_baseline_and_model": rss - baseline - info["param_bytes"],
                                 "bound_bytes": bound, "within_bound": rss <= bound, "seconds": round(seconds, 1)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            shutil.rmtree(hf)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"bench": "quantize_memory", "machine": machine(), "baseline_rss_bytes": baseline,
                      "layer_bf16_bytes": layer_bytes, "runs": rows}))


if __name__ == "__main__":
    main()
