"""The engine's compiled programs: `engine_step` jitted with its one static flag (prompt logprobs), the
pool's memory format, the token widths, and the list of every program a run can select
(`engine_programs`: what `Engine.warmup` compiles and what `compile-check` compiles ahead of time), and
the pool's size in pages (`pool_pages`: from a page count, a byte budget or a share of free memory).

Programs: one per token width T of the ladder (`token_widths`: 16, 24, 32, 48, 64, 96, ... up to the
step's token budget, prefill_chunk + rows) and per prompt-logprobs flag. Sampling and top-logprob
alternatives are run-time flags (a `cond`), so they add no program.

The pool's memory layout: the pool crosses the jit boundary at every step, and on TPU the compiler keeps
it in its own tiled layout, not row-major; a pool in the default layout would be copied whole around
every step. So the step is compiled once with `Layout.AUTO` for the pool (`pages_format`), the pool is
put in that format, and every program fixes that format for the pool in and out, donated: it stays in
place from step to step. On CPU the chosen layout is the default, so there the pool keeps its sharding and
that compile (seconds per pool shape, as much as one step program) is skipped.

The steps take the graphdef closed over and the state as its flat list of leaves (`_bound`): per call,
jit hashes one flag and flattens a list in C++ instead of hashing a graphdef and flattening an
`nnx.State` in Python (~2 ms a call: a tiny model's whole step costs a few ms).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from inference.engine.request import EngineError
from inference.engine.steps import StepInputs, engine_step
from jaxmodel.kv_cache import page_bytes, pool_dtype

MIN_WIDTH = 16
MEMORY_CAP = 0.9  # the default pool takes at most this share of the free memory
_FORMATS: dict = {}


def ladder_width(n: int) -> int:
    """The ladder width for n tokens: 16, 24, 32, 48, 64, 96, 128, ... (2^k and 1.5 x 2^k: a step is at
    most a third padding, where powers of two alone allow half)."""
    if n <= MIN_WIDTH:
        return MIN_WIDTH
    power = 1 << (n - 1).bit_length()
    return power * 3 // 4 if power * 3 // 4 >= n else power


def token_widths(prefill_chunk: int, rows: int) -> list[int]:
    """The token widths of the step programs: the ladder below the step's token budget (prefill_chunk +
    rows: every decoding row plus one chunk of prompt), then the budget itself, rounded up to 8."""
    budget = -(-(prefill_chunk + rows) // 8) * 8
    widths = []
    while not widths or widths[-1] < budget:
        widths.append(min(ladder_width(widths[-1] + 1 if widths else 1), budget))
    return widths


def step_width(n: int, widths: list[int]) -> int:
    """The narrowest program width that holds n tokens."""
    return next(w for w in widths if w >= n)


def token_sharding(mesh):
    """Where the step's small outputs live (replicated over the mesh): the next step takes the token
    vector back in, so its sharding is fixed, in and out, and the first step's zeros are put there too
    (another sharding would be another program)."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, PartitionSpec())


def abstract_inputs(width: int, rows: int, pages_per_row: int) -> StepInputs:
    """StepInputs of ShapeDtypeStructs for a step of `width` tokens."""
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    return StepInputs(ids=i32(width), feed=i32(width), positions=i32(width), targets=i32(width),
                      page_table=i32(rows, pages_per_row), kv_lens=i32(rows), cu_q_lens=i32(rows + 1),
                      num_seqs=i32(1), logits_at=i32(rows), temperature=f32(rows), top_k=i32(rows),
                      top_p=f32(rows), seeds=i32(rows), streams=i32(rows), steps=i32(rows),
                      want_top=jax.ShapeDtypeStruct((), jnp.bool_))


def empty_inputs(width: int, rows: int, pages_per_row: int) -> StepInputs:
    """Host StepInputs of a step that computes nothing (no sequence: num_seqs 0, every token padding, no
    token fed, top_p 1), to be filled in: fresh copies of one template per shape (a step's arrays may
    still be read by the device call dispatched before, so they are never reused)."""
    return jax.tree.map(np.copy, _empty_template(width, rows, pages_per_row))


@functools.lru_cache(maxsize=64)
def _empty_template(width: int, rows: int, pages_per_row: int) -> StepInputs:
    x = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_inputs(width, rows, pages_per_row))
    x.feed[:], x.top_p[:] = -1, 1.0
    return x


def plan_inputs(entries, fed_rows: dict, *, width: int, rows: int, pages_per_row: int) -> tuple[StepInputs, list]:
    """A plan's entries (scheduler.Entry: seq, start, count, samples) as the host arrays of one step of
    `width` tokens -> (StepInputs, [(seq, its epoch, start, count, samples)] per row). Entry r is row r, its
    tokens at [cu_q_lens[r], cu_q_lens[r + 1]). A position past the tokens the host knows is the newest
    token of a sequence the previous call sampled: fed from that call's row (fed_rows: seq id -> (row,
    epoch))."""
    x = empty_inputs(width, rows, pages_per_row)
    at, out = 0, []
    for r, (seq, start, count, samples) in enumerate(entries):
        req, end = seq.request, start + count
        known = seq.tokens[start:end]
        x.ids[at:at + len(known)] = known
        if len(known) < count:  # the newest token is the last call's output, still on the device
            row, epoch = fed_rows.get(seq.rid, (None, None))
            if len(known) != count - 1 or epoch != seq.epoch:
                raise RuntimeError(f"sequence {seq.rid}: token {start + len(known)} is neither known nor in flight")
            x.feed[at + len(known)] = row
        x.positions[at:at + count] = np.arange(start, end)
        targets = seq.tokens[start + 1:end + 1]  # the next tokens: prompt logprobs' targets
        x.targets[at:at + len(targets)] = targets
        x.page_table[r, :len(seq.pages)] = seq.pages
        x.kv_lens[r], x.cu_q_lens[r + 1], x.logits_at[r] = end, at + count, at + count - 1
        x.temperature[r], x.top_k[r], x.top_p[r] = req.temperature, req.top_k, req.top_p
        # the sampling key's token index: the generated token this row samples (the same after a preemption)
        x.seeds[r], x.streams[r], x.steps[r] = np.int32(req.seed & 0x7FFFFFFF), req.stream_id, end - seq.prompt_len
        out.append((seq, seq.epoch, start, count, samples))
        at += count
    x.cu_q_lens[len(entries) + 1:] = at
    x.num_seqs[0] = len(entries)
    x.want_top[...] = any(e.seq.request.logprobs for e in entries if e.samples) or any(
        e.seq.request.prompt_logprobs for e in entries)
    return x, out


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def _bound(graphdef, treedef) -> Callable:
    """engine_step(graphdef, prompt_lp, state, ...) as step(prompt_lp, leaves, ...)."""
    def step(prompt_lp, leaves, pages, prev_tokens, inputs):
        return engine_step(graphdef, prompt_lp, jax.tree.unflatten(treedef, leaves), pages, prev_tokens, inputs)
    step.__name__ = "engine_step"
    return step


@functools.lru_cache(maxsize=16)
def jitted_step(graphdef, treedef, formats, tokens) -> Callable:
    """The step for the model `graphdef` and a state of structure `treedef`, jitted with prompt_lp static,
    the pool donated and in `formats` in and out, the token vectors in `tokens` sharding. Called as
    step(prompt_lp, leaves, pages, prev_tokens, inputs) -> (StepOutputs, pages)."""
    return jax.jit(_bound(graphdef, treedef), static_argnums=(0,), donate_argnums=(2,),
                   in_shardings=(None, formats, tokens, None), out_shardings=(tokens, formats))


def pages_format(graphdef, state, pages, *, rows: int, pages_per_row: int):
    """The format (layout + sharding) per pool leaf that the step prefers: the step compiled once with
    `Layout.AUTO` for the pool in and out (remembered per model and pool shape). `state` and `pages` may
    be arrays or ShapeDtypeStructs with shardings (ahead of time)."""
    abstract_state, abstract_pages = _abstract(state), _abstract(pages)
    sharding = jax.tree.leaves(abstract_pages)[0].sharding
    devices = sharding.device_set if sharding is not None else jax.devices()
    if all(d.platform == "cpu" for d in devices):  # the CPU compiler's layout is the default: nothing to ask
        return jax.tree.map(lambda x: x.sharding or SingleDeviceSharding(jax.devices()[0]), abstract_pages)
    leaves, treedef = jax.tree.flatten(abstract_state)
    key = (graphdef, tuple(leaves), tuple(jax.tree.leaves(abstract_pages)), rows, pages_per_row)
    if key not in _FORMATS:
        auto = jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding), abstract_pages)
        step = jax.jit(_bound(graphdef, treedef), static_argnums=(0,), donate_argnums=(2,),
                       in_shardings=(None, auto, None, None),
                       out_shardings=Format(Layout.AUTO))  # all AUTO: donation pairs buffers by shape
        exe = step.lower(False, leaves, abstract_pages, jax.ShapeDtypeStruct((rows,), jnp.int32),
                         abstract_inputs(MIN_WIDTH, rows, pages_per_row)).compile()
        _FORMATS[key] = exe.input_formats[0][1]
    return _FORMATS[key]


def engine_programs(graphdef, state, pages, *, rows: int, pages_per_row: int, widths, formats=None,
                    mesh=None) -> list[tuple[str, Callable, tuple]]:
    """Every program a run can select, as (name, jitted step, example abstract args): one per width of
    `widths` and prompt-logprobs flag, "step_t{T}" and "step_t{T}_prompt_lp". Compile one with
    `step.lower(*args).compile()` (inside `jax.set_mesh(mesh)` on a mesh). state / pages may be abstract;
    formats: the pool's (`pages_format`, computed when None)."""
    if formats is None:
        formats = pages_format(graphdef, state, pages, rows=rows, pages_per_row=pages_per_row)
    tokens = token_sharding(mesh)
    leaves, treedef = jax.tree.flatten(_abstract(state))
    step = jitted_step(graphdef, treedef, formats, tokens)
    abstract_pages = jax.tree.map(lambda x, f: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=f),
                                  _abstract(pages), formats)
    prev = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=tokens)
    return [(f"step_t{width}" + ("_prompt_lp" if prompt_lp else ""), step,
             (prompt_lp, leaves, abstract_pages, prev, abstract_inputs(width, rows, pages_per_row)))
            for width in widths for prompt_lp in (False, True)]


# -- the pool's size --------------------------------------------------------------------------------------


def free_memory(device) -> int | None:
    """Free bytes on the device (its allocator's limit less what is in use: the weights are loaded by
    now), the host's available memory on CPU, None where a device does not say."""
    if device.platform == "cpu":
        import psutil

        return psutil.virtual_memory().available
    stats = device.memory_stats()
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0) if stats and "bytes_limit" in stats else None


def pool_pages(config, *, max_model_len: int, page_size: int, kv_cache_dtype, slots: int, mesh=None,
               num_pages: int | None = None, memory: int | float | None = None, free: int | None = None) -> int:
    """The pool's pages: `num_pages`, or `memory` bytes (an int) or that fraction of the free device memory
    (a float in (0, 1]), or by default pages for `slots` sequences of max_model_len capped at MEMORY_CAP of
    the free memory; refused (EngineError, one line) below one max_model_len sequence. Per device: on a
    mesh the pool is sharded over the KV heads on the tensor axis. free: the free bytes (default: asked
    of the first device)."""
    per_page = page_bytes(config, page_size, kv_cache_dtype, pool_dtype(config, kv_dtype=kv_cache_dtype, mesh=mesh))
    tensor = mesh.shape.get("tensor", 1) if mesh is not None else 1
    per_page //= tensor if config.num_key_value_heads % tensor == 0 else 1
    need = -(-max_model_len // page_size)
    if num_pages is not None and memory is not None:
        raise EngineError("give num_pages or kv_cache_memory, not both")
    if free is None and num_pages is None:
        free = free_memory(jax.devices()[0])
    if num_pages is not None:
        what = f"num_pages={num_pages}"
    elif isinstance(memory, float):
        if not 0 < memory <= 1:
            raise EngineError(f"kv_cache_memory={memory} must be a fraction in (0, 1] or a number of bytes")
        if free is None:
            raise EngineError(f"kv_cache_memory={memory}: this device does not report its free memory")
        num_pages, what = int(free * memory) // per_page, f"kv_cache_memory={memory} of {free} free bytes"
    elif memory is not None:
        num_pages, what = int(memory) // per_page, f"kv_cache_memory={memory} bytes"
    else:
        num_pages, what = slots * need, "the default pool"
        if free is not None:
            num_pages = min(num_pages, int(free * MEMORY_CAP) // per_page)
    if num_pages < need:
        raise EngineError(f"{what} gives {num_pages} KV cache pages of {page_size} tokens ({per_page} bytes "
                          f"each): one max_model_len={max_model_len} sequence needs {need}")
    return int(num_pages)
