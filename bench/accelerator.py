"""One benchmark for an accelerator (any JAX backend: GPU, TPU, or CPU with --tiny): the chip's ceilings,
the 11B model's train step and serving steps at their real widths, and PyTorch beside ours.

Run: `python bench/accelerator.py [--quick | --tiny] [--json OUT] [--budget SECONDS]` (`make bench-accelerator`).

What it measures (run in this order, which is also the priority when the time budget runs short: the
ceilings; the train rows of the recipe's attention, each with its torch row; the serving rows, bf16
weights first; the train rows of the backend's other attention implementations):
1. ceilings: a bf16 [n, n] x [n, n] matmul (FLOP/s) and an elementwise pass over a large float32 buffer
   (bytes read + written per second), each the best of a few rounds (accelerator_parts.py), measured
   again at the end and the higher kept, so every fraction is against the better figure;
2. train: `training.step.make_train_step` exactly as `normistral train` builds it, from the shipped
   recipe (configs/normistral-11b-long-8k-gpu.yaml, or the v5p one on TPU: its dtypes, remat policy,
   loss chunk and optimizer), one sequence of T tokens (8K and 32K), once per attention implementation
   that this backend runs (cudnn and flash on GPU, splash on TPU, xla on CPU), the recipe's first.
   The model has the config's full width but 2 and 4 layers: per layer = (t4 - t2) / 2, and the config's
   L layers take t2 + (L - 2) x per layer (the embedding, lm_head, loss and their optimizer share are
   in t2). MFU: training/metrics.py's FLOPs of the L-layer step over that time, against the measured
   matmul ceiling and against the datasheet peak. No masked-prediction steps (mntp_probability 0: the
   same causal step every time);
3. serve: the engine's own jitted step (`inference.engine.programs.jitted_step`, the page pool in the
   engine's `pages_format`; on CPU that is the default layout, taken without compiling), bf16 or int8
   weights (inference/quantize.py) from the inference recipe (configs/normistral-11b-long-infer-gpu-80gb.yaml,
   its prefill_chunk), a bf16 or int8 page pool holding B sequences of C tokens (16-token pages): a decode
   step (one token of each of the B sequences) and a prefill step (one sequence, one chunk ending at C;
   its cost does not depend on B, so it is timed at the smallest B), per layer and extrapolated to L
   layers as above. Bandwidth fraction: the bytes a step must read (every weight but the embedding table,
   and the KV cache it attends over: all B x C tokens for decode, one sequence for prefill) over the step
   time, against the measured copy rate and the datasheet bandwidth;
4. torch: at each training row, one decoder layer's forward+backward, ours against transformers'
   `MistralDecoderLayer` (sdpa; torch.compile on CUDA), timed alternately (accelerator_parts.py);
   ratio = torch / ours (above 1: ours is faster). Only where `import torch` works: on CUDA when JAX
   runs on a GPU that torch sees, on the CPU when JAX runs on the CPU (so --tiny fills the column);
   otherwise (a TPU, a CPU-only torch) the row is skipped with the reason.

Each configuration is first checked against the device's free memory (skipped with the estimate rather
than run out of memory); an OOM or any error is recorded as that row's status and the run goes on (the
exit status is 1 at the end if a row failed with an error; OOMs and skips are findings, status 0). A
configuration starts only if the budget left is at least the longest one of its kind so far (a skipped
row says so). The first call's time (compile included) is reported beside the medians. Progress goes to
stderr; the table is printed last on stdout and the full numbers are written as JSON (--json).

Plans: the default (about 8 minutes on one H100), --quick (the recipe's attention only, 8K, two serving
configurations, eager torch; under 3 minutes) and --tiny (MistralConfig.tiny shapes, for CPU and the
test suite; under a minute on 2 idle cores: its numbers mean nothing, so it also sets XLA's backend
optimization level to 0 unless XLA_FLAGS is set, which halves the compile time).
SIGTERM ends a run as Ctrl-C does (exit 130, no JSON written); a bad flag is one line before any work.

Files: the timing pieces are in accelerator_parts.py and the table/JSON in accelerator_report.py; what stays
here (~560 lines, a tenth of them this docstring) is the plans and the measuring loop (`Bench`), whose rows
share one device, one time budget and the ceilings, and read best in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import os
import platform
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:  # the one line a machine without the project's dependencies gets (e.g. a newer JAX's missing API)
    import jax
    import numpy as np
    from accelerator_parts import copy_ceiling, datasheet, device_memory, failure, layer_vs_torch, matmul_ceiling, timed
    from accelerator_report import COLUMNS, header, table, versions, write_json
    from flax import nnx

    from inference.engine.programs import (
        empty_inputs,
        jitted_step,
        pages_format,
        step_width,
        token_sharding,
        token_widths,
    )
    from inference.quantize import quantize_model
    from jaxmodel.kv_cache import abstract_pages, init_pages, pages_per_seq
    from jaxmodel.model import init_model
    from jaxmodel.run_config import find_config, load_run_config, model_config
    from jaxmodel.sharding import make_mesh
    from training import config as train_config
    from training import step as steps_lib
    from training.metrics import matmul_params, train_flops_per_step
except ImportError as e:
    sys.exit(f"normistral: error: bench/accelerator.py cannot import {e.name or e} ({e}); install the "
             "project's dependencies (pip install -e .) or a JAX with a matching flax")

TRAIN_RECIPES = {"tpu": "normistral-11b-long-32k-v5p"}  # else the GPU recipe (the same remat policy)
TRAIN_RECIPE = "normistral-11b-long-8k-gpu"
SERVE_RECIPE = "normistral-11b-long-infer-gpu-80gb"
IMPLS = {"gpu": ("cudnn", "flash"), "tpu": ("splash",), "cpu": ("xla",)}  # what runs on each backend
NA = "-"  # a cell that does not apply to the row's kind


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    train_lengths: tuple[int, ...]
    serve: tuple[tuple[str, str, int, int], ...]  # (weights, kv cache, rows B, tokens per row C)
    all_impls: bool  # every attention implementation of the backend, or the recipe's alone
    matmul_n: int
    copy_bytes: int
    repeats: int
    budget_s: float
    torch_compile: bool
    tiny: bool = False
    layer_counts: tuple[int, int] = (2, 4)


SERVE_FULL = tuple(itertools.product(("bfloat16", "int8"), ("bfloat16", "int8"), (8, 32), (1024, 8192)))
PLANS = {
    "full": Plan("full", train_lengths=(8192, 32768), serve=SERVE_FULL, all_impls=True, matmul_n=8192,
                 copy_bytes=2 << 30, repeats=5, budget_s=420.0, torch_compile=True),
    "quick": Plan("quick", train_lengths=(8192,), serve=(("bfloat16", "bfloat16", 8, 1024), ("int8", "int8", 32, 8192)),
                  all_impls=False, matmul_n=8192, copy_bytes=1 << 30, repeats=3, budget_s=140.0, torch_compile=False),
    "tiny": Plan("tiny", train_lengths=(128,), serve=(("bfloat16", "bfloat16", 2, 64), ("int8", "int8", 4, 64)),
                 all_impls=True, matmul_n=256, copy_bytes=4 << 20, repeats=2, budget_s=600.0, torch_compile=False,
                 tiny=True),
}


class Skip(Exception):
    """A configuration not run (the message says why: memory estimate, time budget)."""


_STARTED = time.monotonic()


def _log(message: str) -> None:
    print(f"[accelerator {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- configs -------------------------------------------------------------------------------------------


def _recipe(name: str, plan: Plan, overrides: list[str]) -> dict:
    tiny = ["model.preset=tiny"] if plan.tiny else []
    return load_run_config(find_config(name), [*tiny, *overrides])


def train_run(platform_: str, plan: Plan, layers: int | None, tokens: int, impl: str | None):
    """The shipped training recipe as `normistral train` reads it, on one device, one sequence of `tokens`;
    `layers` and `impl` replace the recipe's layer count and attention when given."""
    sets = ["model.init_from=null", f"train.seq_len={tokens}", "train.global_batch_size=1", "train.microbatches=1",
            "train.mntp_probability=0", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
    sets += [f"model.num_hidden_layers={layers}"] if layers else []
    sets += [f"model.attention_impl={impl}"] if impl else []
    return train_config.load(_recipe(TRAIN_RECIPES.get(platform_, TRAIN_RECIPE), plan, sets))


def serve_model_config(plan: Plan):
    tree = _recipe(SERVE_RECIPE, plan, [])
    chunk = int((tree.get("inference") or {}).get("prefill_chunk", 512))
    return model_config(tree), (min(chunk, 16) if plan.tiny else chunk)


# -- memory ---------------------------------------------------------------------------------------------


def free_bytes(device) -> int | None:
    limit = device_memory(device)
    if limit is None and device.platform == "cpu":
        try:
            limit = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return limit


def check_memory(device, need: float, what: str) -> None:
    """Skips a configuration whose estimate (a lower bound: an actual OOM is caught and recorded) exceeds
    the device's free memory."""
    free = free_bytes(device)
    if free is not None and need > free:
        raise Skip(f"skipped: {what} needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")


def train_bytes(cfg, tokens: int, impl: str, loss_chunk: int) -> float:
    """About the least one train step holds: float32 params, gradients and two Adam moments, each layer's
    saved input (full remat), one layer's recompute (forward and backward activations), the loss chunk's
    float32 logits, and the [T, S] scores (xla) or boolean mask (cudnn) where the attention builds them."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    layer = tokens * (8 * d + 3 * f + 2 * qkv) * 2 * 2
    scores = {"xla": cfg.num_attention_heads * 4 * 2, "cudnn": 1}.get(impl, 0) * tokens**2
    logits = min(loss_chunk, tokens) * cfg.vocab_size * 4 * 3
    return 16 * cfg.num_params() + cfg.num_hidden_layers * tokens * d * 2 + layer + scores + logits


# -- rows -------------------------------------------------------------------------------------------------


def _extrapolate(times: dict[int, float], layers: int) -> tuple[float, float, str]:
    """(per-layer seconds, the config's L-layer step seconds, how) from medians at two layer counts."""
    (l1, t1), (l2, t2) = sorted(times.items())
    per_layer = (t2 - t1) / (l2 - l1)
    if per_layer <= 0:  # below the timing noise (tiny shapes on a busy CPU): an upper bound instead
        return t2 / l2, t2 / l2 * layers, f"t{l2}/{l2} (t{l2} <= t{l1}: difference below noise)"
    return per_layer, t1 + (layers - l1) * per_layer, f"(t{l2} - t{l1}) / {l2 - l1}"


def _fraction(num: float, den: float | None):
    return num / den if den else "n/a"


class Bench:
    def __init__(self, plan: Plan, device, budget_s: float, torch_ok: str | None):
        self.plan, self.device = plan, device
        self.platform = device.platform
        self.peak_flops, self.peak_bw = datasheet(device.device_kind)
        self.deadline = time.monotonic() + budget_s
        self.budget_s = budget_s
        self.longest: dict[str, float] = {}
        self.torch_ok = torch_ok  # None: torch usable, else why not
        self.rows: list[dict] = []
        self.ceilings: dict = {}
        self._models: dict = {}

    # The budget: a configuration starts only if the longest of its kind so far still fits.
    def run(self, kind: str, base: dict, fn) -> dict:
        row = {c: NA for c in COLUMNS} | base
        left = self.deadline - time.monotonic()
        if left < self.longest.get(kind, 0.0) or left <= 0:
            row["status"] = f"skipped: time budget (--budget {self.budget_s:g} s) spent"
        else:
            start = time.monotonic()
            try:
                row.update(fn())
                row["status"] = row.get("status") if row.get("status") not in (None, NA) else "ok"
            except Skip as e:
                row["status"] = str(e)
            except Exception as e:  # noqa: BLE001  (one failing configuration never ends the run)
                row["status"] = failure(e)
            self.longest[kind] = max(self.longest.get(kind, 0.0), time.monotonic() - start)
        _log(f"{row['part']:8} {row['config']:40} {row['status']}")
        self.rows.append(row)
        return row

    # -- 1. ceilings
    def measure_ceilings(self) -> None:
        """The matmul and copy rates; measured again at the end, the higher of the two kept (the chip's
        clock and a shared machine's load drift: the higher ceiling gives the conservative fractions)."""
        free = free_bytes(self.device)
        nbytes = int(self.plan.copy_bytes if free is None else min(self.plan.copy_bytes, free // 8))
        n = self.plan.matmul_n
        flops, rate = matmul_ceiling(n, self.device), copy_ceiling(nbytes, self.device)
        old = self.ceilings
        self.ceilings = {"matmul_n": n, "matmul_flops": max(flops, old.get("matmul_flops", 0.0)),
                         "copy_bytes": nbytes, "copy_bytes_per_s": max(rate, old.get("copy_bytes_per_s", 0.0))}
        _log(f"ceilings: bf16 matmul {flops / 1e12:.2f} TFLOP/s, copy {rate / 1e12:.3f} TB/s")

    def finish(self) -> None:
        """The fractions of every row, against the final ceilings and the datasheet."""
        self.measure_ceilings()
        for row in self.rows:
            if "flops_per_s" in row:
                row["mfu"] = row["flops_per_s"] / self.ceilings["matmul_flops"]
                row["mfu_datasheet"] = _fraction(row["flops_per_s"], self.peak_flops)
            if "floor_bytes_per_s" in row:
                row["bw_fraction"] = row["floor_bytes_per_s"] / self.ceilings["copy_bytes_per_s"]
                row["bw_fraction_datasheet"] = _fraction(row["floor_bytes_per_s"], self.peak_bw)

    # -- 2. training
    def train(self, tokens: int, impl: str) -> dict:
        medians, firsts = {}, {}
        for layers in self.plan.layer_counts:
            run = train_run(self.platform, self.plan, layers, tokens, impl)
            check_memory(self.device, train_bytes(run.model, tokens, impl, run.train.loss_chunk),
                         f"{layers} layers x {tokens} tokens")
            firsts[layers], medians[layers] = self._time_train(run, tokens)
        cfg = train_run(self.platform, self.plan, None, tokens, impl).model
        per_layer, step, how = _extrapolate(medians, self.layers)
        flops = train_flops_per_step(cfg, 1, tokens)
        return {"first_call_s": max(firsts.values()), "layer_ms": per_layer * 1e3, "step_ms": step * 1e3,
                "tokens_per_s": tokens / step, "flops_per_s": flops / step, "per_layer_from": how,
                "medians_s": {str(k): v for k, v in medians.items()}, "remat": run.model.remat,
                "flops_per_step": flops}

    def _time_train(self, run, tokens: int) -> tuple[float, float]:
        ts = steps_lib.setup(run, make_mesh((1, 1, 1), devices=[self.device]))
        rng = np.random.default_rng(0)
        ids = rng.integers(16, run.model.vocab_size, size=(1, tokens + 1))
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": np.ones((1, tokens), np.int32),
                 "positions": np.arange(tokens)[None], "loss_mask": np.ones((1, tokens), np.float32)}
        holder = {"state": steps_lib.init_state(ts)}
        train_step = steps_lib.make_train_step(ts)
        jbatch = steps_lib.put_batch(ts, batch)

        def step():
            holder["state"], metrics = train_step(holder["state"], jbatch)
            jax.block_until_ready(metrics)

        try:
            with jax.set_mesh(ts.mesh):
                return timed(step, repeats=self.plan.repeats)
        finally:
            holder.clear()

    # -- 4. torch beside a training row
    def torch_row(self, tokens: int, impl: str) -> dict:
        if self.torch_ok:
            raise Skip(f"skipped: {self.torch_ok}")
        cfg = train_run(self.platform, self.plan, 1, tokens, impl).model
        out = layer_vs_torch(cfg, impl, tokens, self.device, compile_=self.plan.torch_compile,
                             repeats=self.plan.repeats)
        return {"first_call_s": out["jax_first_call_s"], "layer_ms": out["jax_layer_s"] * 1e3,
                "torch_ratio": out["ratio"], **out}

    # -- 3. serving
    def _model(self, weights: str, layers: int):
        key = (weights, layers)
        if key not in self._models:
            for old in [k for k in self._models if k[0] != weights]:  # one weight format in memory at a time
                del self._models[old]
            cfg = self.serve_cfg.replace(num_hidden_layers=layers)
            # bf16 parameters (int8 ones are quantized from them, layer by layer).
            check_memory(self.device, 2 * cfg.num_params(), f"{weights} weights, {layers} layers")
            with jax.default_device(self.device):
                # One jitted init (eager init would compile every parameter's initializer on its own).
                graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg)))
                model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(init_model(cfg)))())
                if weights == "int8":
                    quantize_model(model, "int8")
            graphdef, state = nnx.split(model)
            weight_bytes = sum(stored_bytes(v) for p, v in nnx.to_flat_state(state) if p[0] != "embed_tokens")
            self._models[key] = (graphdef, state, weight_bytes)
        return self._models[key]

    def serve(self, weights: str, kv: str, rows: int, context: int, prefill: bool) -> dict:
        kv_dtype = "int8" if kv == "int8" else None
        out = {}
        for layers in self.plan.layer_counts:
            graphdef, state, weight_bytes = self._model(weights, layers)
            cfg = self.serve_cfg.replace(num_hidden_layers=layers)
            shapes = abstract_pages(cfg, rows * pages_per_seq(context, PAGE), PAGE, kv_dtype=kv_dtype)
            cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
            check_memory(self.device, cache_bytes + rows * cfg.vocab_size * 4 * 2,  # + the float32 logits
                         f"{kv} cache {rows} x {context}, {layers} layers")
            first, median = self._time_serve(graphdef, state, cfg, rows, context, kv_dtype, prefill)
            out[layers] = (first, median, weight_bytes, cache_bytes)
        return self._serve_numbers(out, rows, context, prefill)

    def _time_serve(self, graphdef, state, cfg, rows, context, kv_dtype, prefill: bool):
        """(first call, median) of the engine's step: a decode step of `rows` sequences of `context` tokens,
        or a prefill step of one chunk ending at `context` (sequence 0), on a pool holding them all."""
        width_of = pages_per_seq(context, PAGE)
        with jax.default_device(self.device):
            pages = init_pages(cfg, rows * width_of, PAGE, kv_dtype=kv_dtype)
            formats = pages_format(graphdef, state, pages, rows=rows, pages_per_row=width_of)
            leaves, treedef = jax.tree.flatten(state)
            tokens = token_sharding(None)
            step = functools.partial(jitted_step(graphdef, treedef, formats, tokens), False)
            holder = {"pages": jax.device_put(pages, formats, donate=True)}
            del pages
            inputs = _step_inputs(rows, context, width_of, self.prefill_chunk,
                                  self.prefill_chunk if prefill else None)
            prev = jax.device_put(np.zeros(rows, np.int32), tokens)

        def call():
            out, holder["pages"] = step(leaves, holder["pages"], prev, inputs)  # donated: the new pool from now on
            jax.block_until_ready(out)

        try:
            return timed(call, repeats=self.plan.repeats)
        finally:
            holder.clear()

    def _serve_numbers(self, out: dict, rows: int, context: int, prefill: bool) -> dict:
        cfg = self.serve_cfg
        medians = {layers: v[1] for layers, v in out.items()}
        per_layer, step, how = _extrapolate(medians, self.layers)
        (l1, (_, _, w1, c1)), (l2, (_, _, w2, c2)) = sorted(out.items())
        at = lambda a, b: a + (self.layers - l1) * (b - a) / (l2 - l1)  # noqa: E731  (bytes are linear in L)
        weight_bytes, cache_bytes = at(w1, w2), at(c1, c2)
        attention = 4 * cfg.num_attention_heads * cfg.head_dim * self.layers  # FLOPs per (query, key) pair
        if prefill:
            chunk = self.prefill_chunk
            floor_bytes = weight_bytes + cache_bytes / rows  # one row's cache
            flops = 2 * matmul_params(cfg) * chunk + attention * chunk * (context - chunk / 2)
            tokens = chunk
        else:
            floor_bytes = weight_bytes + cache_bytes
            flops = (2 * matmul_params(cfg) + attention * context) * rows
            tokens = rows
        return {"first_call_s": max(v[0] for v in out.values()), "layer_ms": per_layer * 1e3, "step_ms": step * 1e3,
                "tokens_per_s": tokens / step, "flops_per_s": flops / step,
                "floor_bytes_per_s": floor_bytes / step,
                "per_layer_from": how, "medians_s": {str(k): v for k, v in medians.items()},
                "floor_bytes": floor_bytes, "weight_bytes": weight_bytes, "kv_cache_bytes": cache_bytes}

    # -- the whole run, by priority
    def run_all(self) -> None:
        self.measure_ceilings()
        recipe = train_run(self.platform, self.plan, None, self.plan.train_lengths[0], None).model
        self.layers = recipe.num_hidden_layers
        runs = IMPLS.get(self.platform, ("xla",))
        impls = (recipe.attention_impl, *(i for i in runs if i != recipe.attention_impl)) \
            if recipe.attention_impl in runs else runs
        self.serve_cfg, self.prefill_chunk = serve_model_config(self.plan)
        for tokens in self.plan.train_lengths:  # the shipped attention first
            self._train_and_torch(tokens, impls[0])
        smallest = {}  # the prefill step's cost does not depend on the rows: timed once, at the fewest
        for weights, kv, rows, context in self.plan.serve:
            smallest[(weights, kv, context)] = min(rows, smallest.get((weights, kv, context), rows))
        for weights, kv, rows, context in sorted(self.plan.serve, key=lambda s: s[0] != "bfloat16"):
            name = f"{_short(weights)} w, {_short(kv)} kv, {rows} x {context}"
            self.run("decode", {"part": "decode", "config": name},
                     functools.partial(self.serve, weights, kv, rows, context, prefill=False))
            if smallest[(weights, kv, context)] == rows:
                name = f"{_short(weights)} w, {_short(kv)} kv, {self.prefill_chunk} tok at {context}"
                self.run("prefill", {"part": "prefill", "config": name},
                         functools.partial(self.serve, weights, kv, rows, context, prefill=True))
        self._models.clear()
        for impl in impls[1:] if self.plan.all_impls else ():
            for tokens in self.plan.train_lengths:
                self._train_and_torch(tokens, impl)

    def _train_and_torch(self, tokens: int, impl: str) -> None:
        name = f"1 x {tokens} tok, {impl}"
        row = self.run("train", {"part": "train", "config": name}, lambda: self.train(tokens, impl))
        torch_row = self.run("torch", {"part": "torch", "config": f"layer fwd+bwd, {name}"},
                             lambda: self.torch_row(tokens, impl))
        if isinstance(torch_row.get("torch_ratio"), float):
            row["torch_ratio"] = torch_row["torch_ratio"]


def _step_inputs(rows: int, context: int, width_of: int, prefill_chunk: int, chunk: int | None):
    """The step's host inputs, greedy: sequence r owns pages [r * W, (r + 1) * W) and holds `context` tokens
    once the step's are written; a decode step feeds one token of each sequence (at position context - 1),
    a prefill step (chunk given) the `chunk` tokens of sequence 0 ending at context."""
    widths = token_widths(prefill_chunk, rows)  # the engine's program widths
    x = empty_inputs(step_width(rows if chunk is None else chunk, widths), rows, width_of)
    x.page_table[:] = np.arange(rows * width_of, dtype=np.int32).reshape(rows, width_of)
    seqs = rows if chunk is None else 1
    x.kv_lens[:seqs] = context
    x.num_seqs[0] = seqs
    if chunk is None:
        x.positions[:rows] = context - 1
        x.cu_q_lens[:] = np.minimum(np.arange(rows + 1), rows)
        x.logits_at[:] = np.arange(rows)
    else:
        x.positions[:chunk] = np.arange(context - chunk, context)
        x.cu_q_lens[1:] = chunk
        x.logits_at[0] = chunk - 1
    return x


PAGE = 16  # tokens per page, the engine's default


def stored_bytes(x) -> int:
    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(x))


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16"}.get(dtype, dtype)


def _torch_state(platform_: str) -> tuple[str | None, str]:
    """(None if torch can run the comparison on this device, else why not; its version)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        return f"the PyTorch comparison needs {e.name} (not installed)", "not installed"
    if platform_ != "cpu" and not (platform_ == "gpu" and torch.cuda.is_available()):
        return f"PyTorch {torch.__version__} does not see this {platform_} (torch.cuda.is_available() is " \
               f"{torch.cuda.is_available()})", torch.__version__
    return None, torch.__version__


class _Parser(argparse.ArgumentParser):
    """The project's error format: usage, then `normistral: error: ...` as the last line (exit 2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"normistral: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog="bench/accelerator.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a subset under 3 minutes on one H100")
    size.add_argument("--tiny", action="store_true", help="MistralConfig.tiny shapes (CPU, tests)")
    parser.add_argument("--json", help="write the full numbers here as JSON")
    parser.add_argument("--budget", type=float, help="seconds of configurations before the rest are skipped "
                        "(default: the plan's, 420 / 140 / 600)")
    parser.add_argument("--repeats", type=int, help="timed calls per configuration (default: the plan's)")
    args = parser.parse_args(argv)
    if args.budget is not None and not args.budget > 0:  # also refuses nan
        parser.error(f"--budget {args.budget:g}: must be a positive number of seconds")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json):
            parser.error(f"--json {args.json}: is a directory, expected a file path")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"--json {args.json}: directory {folder} does not exist or is not writable")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM ends the run as Ctrl-C does
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    started = time.monotonic()
    if plan.tiny and "XLA_FLAGS" not in os.environ:
        # --tiny checks code paths, its numbers mean nothing: halve XLA CPU's compile time (read at the
        # backend's start, just below).
        os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    device = jax.devices()[0]
    torch_ok, torch_version = _torch_state(device.platform)
    bench = Bench(plan, device, args.budget or plan.budget_s, torch_ok)
    _log(f"JAX {jax.__version__} on {device.platform} ({device.device_kind}), plan {plan.name}")
    try:
        bench.run_all()
        bench.finish()
    except KeyboardInterrupt:
        print("normistral: error: interrupted; no results written", file=sys.stderr)
        return 130
    flops, bw = datasheet(device.device_kind)
    result = {"bench": "accelerator", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
              "jax": jax.__version__, "python": platform.python_version(), "torch": torch_version,
              "versions": versions(),
              "plan": plan.name, "layers": bench.layers, "layer_counts": list(plan.layer_counts),
              "ceilings": bench.ceilings, "datasheet": {"bf16_flops": flops, "bytes_per_s": bw},
              "rows": bench.rows, "columns": list(COLUMNS), "wall_s": time.monotonic() - started}
    if args.json:
        write_json(args.json, result)
    print(header(result))
    print(table(bench.rows, bench.layers), flush=True)
    # An OOM or a skip is a finding about the chip or the budget; an error means the run measured less than
    # it should: the table and the JSON are written, and the status says so.
    failed = [r for r in bench.rows if r["status"].startswith("error")]
    if failed:
        print(f"normistral: error: {len(failed)} of {len(bench.rows)} configurations failed, the first: "
              f"{failed[0]['part']} {failed[0]['config']}: {failed[0]['status']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
