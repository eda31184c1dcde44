"""Per-step time of the paged engine's device step, by token width: what one `Engine` call costs on
synthetic plans, without the scheduler or the host loop around it.

Plans (R = --slots rows): width R is a decode-only step (every row one token, each with --context cached
tokens); a wider step keeps half the rows decoding and gives the rest a fresh prompt chunk each, the
width's remaining tokens split evenly (the card workload's mixed steps: new prompts joining decoding
rows). Each width runs with the model loaded as `Generator` / `normistral serve` load it on CPU (layers
unstacked), --repeats timed calls after a warm-up, median reported in ms.

`--code DIR` puts another checkout's packages first on the import path (e.g. the tree before a change, in a
`git worktree`): run both in one session and compare the ratios (the machine may be shared).
Run: `python bench/engine_steps.py --model demo-run/run/hf [--widths 16,32,96,256] [--code /tmp/base]`.
"""

from __future__ import annotations

import argparse
import os
import sys

CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--code" in sys.argv:  # another checkout's packages first: set before importing them
    CODE = os.path.abspath(sys.argv[sys.argv.index("--code") + 1])
sys.path.insert(0, CODE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_seconds  # noqa: E402

from inference.engine import Engine  # noqa: E402
from inference.engine.programs import empty_inputs  # noqa: E402
from jaxmodel import from_pretrained  # noqa: E402
from jaxmodel.model import unstack_layers  # noqa: E402


def plan(engine: Engine, width: int, context: int):
    """Host StepInputs of one synthetic step of `width` tokens (see the module docstring)."""
    rows, page = engine.slots, engine.page_size
    x = empty_inputs(width, rows, engine.pages_per_row)
    decoding = rows if width <= rows else rows // 2
    chunk = (width - decoding) // max(1, rows - decoding)
    lengths = [(context + 1, 1)] * decoding + [(chunk, chunk)] * (rows - decoding)  # (kv_len, q_len)
    at, next_page = 0, 0
    for r, (kv_len, q_len) in enumerate(lengths):
        pages = -(-kv_len // page)
        x.page_table[r, :pages] = np.arange(next_page, next_page + pages)
        next_page += pages
        x.ids[at:at + q_len] = np.arange(q_len) % 100 + 5
        x.positions[at:at + q_len] = np.arange(kv_len - q_len, kv_len)
        x.kv_lens[r], x.cu_q_lens[r + 1], x.logits_at[r] = kv_len, at + q_len, at + q_len - 1
        at += q_len
    x.num_seqs[0] = rows
    assert next_page <= engine.num_pages and at <= width
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo-run/run/hf", help="a Hugging Face checkpoint directory")
    parser.add_argument("--widths", default="16,32,96,256", help="token widths to time (comma-separated)")
    parser.add_argument("--slots", type=int, default=16, help="rows (sequences) of a step")
    parser.add_argument("--context", type=int, default=48, help="cached tokens of each decoding row")
    parser.add_argument("--max-model-len", type=int, default=512, help="the engine's max_model_len")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and pool")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per width")
    parser.add_argument("--code", help="another checkout whose packages run (see the module docstring)")
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    model = unstack_layers(from_pretrained(args.model, progress=False, dtype=getattr(jnp, args.dtype)))
    engine = Engine(model, slots=args.slots, max_model_len=args.max_model_len,
                    prefill_chunk=max(1, max(widths) - args.slots))
    print(f"code {CODE}, {args.dtype}, max_model_len {engine.max_model_len}, {engine.num_pages} pages, "
          f"program widths {engine.widths}")
    for width in widths:
        program = next(w for w in engine.widths if w >= width)
        x = jax.device_put(plan(engine, program, args.context))

        def call(x=x):
            out, engine.pages = engine._step_fn(False, engine.leaves, engine.pages, engine._tokens, x)
            jax.block_until_ready(out.token)

        ms = median_seconds(call, warmup=3, repeats=args.repeats) * 1e3
        print(f"width {program:4d}: {ms:8.3f} ms/step")


if __name__ == "__main__":
    main()
