"""int8 and int4 weights against bfloat16: next-token agreement, mean KL and greedy translations.

For each model directory given (default: the demo's random stand-in checkpoint `WORKDIR/hf` and its
trained export `WORKDIR/run/hf`, after `normistral demo --workdir WORKDIR`), loads the model in bfloat16
and, through `Generator.from_pretrained(quantize=...)` (streamed), in int8 and int4; runs all of them on
the held-out corpus (training/corpus/heldout.jsonl, packed into rows of --length tokens) and reports,
over every position, how often the quantized model's argmax next token equals bfloat16's and the mean
KL(bfloat16 || quantized) in nats. Then translates the demo's six English-Bokmål pairs greedily with the
card's template (float32, bfloat16, int8, int4) and lists any output that differs from float32's.
Run: `python bench/quantize_quality.py --workdir /tmp/demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import machine  # noqa: E402

from inference import Generator  # noqa: E402
from inference.generate import all_logits  # noqa: E402
from normistral_demo import CORPUS, TEMPLATE, translation_pairs  # noqa: E402


def heldout_rows(tokenizer, length: int, rows: int) -> np.ndarray:
    with open(os.path.join(CORPUS, "heldout.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    ids = [t for text in texts for t in tokenizer(text)["input_ids"]]
    n = min(rows, len(ids) // length)
    return np.asarray(ids[: n * length]).reshape(n, length)


def logits_of(model, ids) -> np.ndarray:
    """Logits at every position through the cached forward (the generation path, quantized weights
    included), 8 rows at a time."""
    return np.concatenate([np.asarray(all_logits(model, ids[i:i + 8])) for i in range(0, len(ids), 8)])


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    lp, lq = jax.nn.log_softmax(reference, -1), jax.nn.log_softmax(other, -1)
    kl = float((jnp.exp(lp) * (lp - lq)).sum(-1).mean())
    return {"agreement": float((reference.argmax(-1) == other.argmax(-1)).mean()), "mean_kl": kl}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/i13-demo", help="a finished `normistral demo` workdir")
    parser.add_argument("--models", nargs="*", help="model directories (default: WORKDIR/hf and WORKDIR/run/hf)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    models = args.models or [os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "run", "hf")]
    pairs = translation_pairs(6)
    report = {"bench": "quantize_quality", "machine": machine(), "group_size": args.group_size, "models": []}
    for path in models:
        gens = {"float32": Generator.from_pretrained(path, dtype=jnp.float32),
                "bfloat16": Generator.from_pretrained(path, dtype=jnp.bfloat16)}
        for mode in ("int8", "int4"):
            gens[mode] = Generator.from_pretrained(path, dtype=jnp.bfloat16, quantize=mode,
                                                   group_size=args.group_size)
        ids = heldout_rows(gens["bfloat16"].tokenizer, args.length, args.rows)
        logits = {name: logits_of(gen.model, ids) for name, gen in gens.items()}
        row = {"model": path, "positions": int(ids.size),
               "bfloat16_vs_float32": compare(logits["float32"], logits["bfloat16"]),
               "int8_vs_bfloat16": compare(logits["bfloat16"], logits["int8"]),
               "int4_vs_bfloat16": compare(logits["bfloat16"], logits["int4"]),
               "translations": {}, "translation_differences": []}
        english = [e for e, _ in pairs]
        for name, gen in gens.items():
            row["translations"][name] = gen.generate(english, template=TEMPLATE, stop="\n", max_new_tokens=32)
        for name in ("bfloat16", "int8", "int4"):
            for i, (a, b) in enumerate(zip(row["translations"]["float32"], row["translations"][name])):
                if a != b:
                    row["translation_differences"].append({"weights": name, "english": english[i], "float32": a,
                                                           name: b})
        row["corpus_matches"] = {name: sum(t == ref for t, (_, ref) in zip(out, pairs))
                                 for name, out in row["translations"].items()}
        report["models"].append(row)
        print(json.dumps(row, ensure_ascii=False), file=sys.stderr, flush=True)
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
