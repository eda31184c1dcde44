"""Ahead-of-time compile of generation for a TPU topology, and its memory verdict.

Inside: `compile_decode(tree, topology) -> dict`; the settings are the YAML `inference:` section read into
`inference.config.InferenceConfig`.

What is compiled (both from a CPU-only machine, for the topology's real TPU executable):
1. The static generation program `generate.generate_jit` for `batch_size` rows: a prompt of
   max_length - max_new_tokens tokens (rounded down to whole prefill chunks when longer than one),
   prefilled chunk by chunk into a cache of max_length slots, then the decode while-loop for
   max_new_tokens tokens. Its memory is the top-level verdict (`fits` and the byte counts): weights + the
   cache, which lives inside the program, + the largest temporaries of prefill and decode.
2. The continuous-batching engine (inference/engine/, what `normistral serve` and `Generator` run),
   reported under "engine": its pool of KV cache pages and the steps that run over it, compiled exactly
   as the engine compiles them (`engine.programs.engine_programs`: the pool in the layout the step
   prefers, donated, fixed in and out). The pool: `kv_cache_memory` bytes (an int or "3GiB"), or that
   fraction of the memory left per chip after the weights (a float in (0, 1]), or by default pages for
   `max_num_seqs` sequences of `max_model_len` tokens, at most 0.9 of what is left. Reported: its pages,
   tokens and bytes (the values' own and as the compiler lays them out), how many sequences of
   `average_len` tokens it holds at once (`max_concurrent_seqs`, at most max_num_seqs), and whether one
   `max_model_len` sequence fits (the engine refuses a pool that cannot hold one). Of the step programs
   (one per token width and prompt-logprobs flag; `programs` counts them) the narrowest (a decode step)
   and the widest with and without prompt logprobs (the most memory) are compiled; `fits` is theirs.

A program that cannot fit at all (libtpu refuses it: RESOURCE_EXHAUSTED) is reported with `fits: false`
and the compiler's figures (`jaxmodel.aot.compile_and_report`), like one that compiles too large.

Weights are in the model's param_dtype, int8 (`quantize: int8`) or packed int4 with a scale per
`group_size` inputs (`quantize: int4`); the cache in the compute dtype or int8 (`kv_cache_dtype: int8`).
`memory_gib` (optional) is the accelerator memory the config targets when it is smaller than the
topology's chip (the model card's "4-bit on an 8 GB card"): `fits` is then judged against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from inference.config import InferenceConfig, inference_config
from inference.engine.programs import engine_programs, pages_format, token_widths
from inference.generate import bucket_length, generate_jit
from inference.quantize import abstract_quantized_state, stored_bytes
from jaxmodel import aot, run_config
from jaxmodel.config import ConfigError
from jaxmodel.kv_cache import abstract_pages, page_bytes, pages_per_seq
from jaxmodel.model import abstract_model
from jaxmodel.sharding import logical_to_spec, make_mesh

DEFAULT_FRACTION = 0.9  # the default pool's cap: this share of the memory left after the weights (as the engine)


def _sds(shape, dtype, mesh, axes=None):
    spec = PartitionSpec() if axes is None else logical_to_spec(axes, shape, mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def compile_decode(tree: dict, topology: str) -> dict:
    """Compiles static generation and the engine's steps for `topology` from a run config; the memory report."""
    where = run_config.where(tree, "inference.max_length")
    config, shape = run_config.model_config(tree), run_config.mesh_shape(tree)
    opts = inference_config(tree)
    context = config.max_position_embeddings
    if opts.max_length > context:
        raise ConfigError(f"{where}: inference.max_length={opts.max_length} exceeds the context ({context})")
    if opts.max_model_len is not None and opts.max_model_len > context:
        raise ConfigError(f"{run_config.where(tree, 'inference.max_model_len')}: inference.max_model_len="
                          f"{opts.max_model_len} exceeds the context ({context})")
    width = bucket_length(opts.max_new_tokens)
    prompt = opts.max_length - width
    if prompt > opts.prefill_chunk:
        prompt -= prompt % opts.prefill_chunk
    if prompt < 1:
        raise ConfigError(f"{where}: inference.max_length={opts.max_length} leaves no room for a prompt before "
                          f"{width} new tokens (max_new_tokens={opts.max_new_tokens}, bucketed)")
    devices = aot.tpu_devices(topology)
    mesh = make_mesh(shape, devices=devices)
    graphdef, state = aot.abstract_state(abstract_model(config), mesh)
    if opts.quantize:
        state = abstract_quantized_state(state, mesh, opts.quantize, opts.group_size)
    batch, vocab = opts.batch_size, config.vocab_size

    ids = _sds((batch, prompt), jnp.int32, mesh, ("batch", "length"))
    scalars = (_sds((), jnp.int32, mesh), _sds((), jnp.int32, mesh), _sds((), jnp.float32, mesh),
               _sds((), jnp.int32, mesh), _sds((), jnp.float32, mesh), jax.eval_shape(lambda: jax.random.key(0)))
    hbm = aot.hbm_bytes(devices[0])
    if opts.memory_gib is not None:
        hbm = min(hbm, int(opts.memory_gib * 1024**3))
    with jax.set_mesh(mesh):  # a program that cannot fit is reported (fits: false), not raised
        report = aot.compile_and_report(generate_jit, (state, ids, ids, _sds((batch,), jnp.bool_, mesh),
                                                        _sds((vocab,), jnp.bool_, mesh), *scalars), hbm,
                                        (graphdef, False, width, opts.kv_cache_dtype, opts.prefill_chunk))
    engine = _compile_engine(config, graphdef, state, mesh, opts, hbm)
    nbytes = lambda tree: sum(stored_bytes(x) for x in jax.tree.leaves(tree))  # noqa: E731 (int4: half a byte)
    return {"mode": "decode", "topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
            "mesh": dict(mesh.shape), "batch_size": batch, "max_length": opts.max_length, "prompt_length": prompt,
            "new_tokens": width, "prefill_chunk": opts.prefill_chunk, "quantize": opts.quantize,
            "group_size": opts.group_size if opts.quantize == "int4" else None,
            "kv_cache_dtype": opts.kv_cache_dtype, "param_bytes_total": nbytes(state),
            "cache_bytes_total": batch * opts.max_length * page_bytes(config, 1, opts.kv_cache_dtype),
            **report, "engine": engine}


def _per_device(tree) -> int:
    """Bytes one device holds of sharded abstract arrays (int4: half a byte an element)."""
    return sum(stored_bytes(x) * int(np.prod(x.sharding.shard_shape(x.shape))) // max(1, int(np.prod(x.shape)))
               for x in jax.tree.leaves(tree))


def _pool_pages(config, mesh, opts: InferenceConfig, state, hbm: int, per_seq: int) -> tuple[int, str]:
    """The pool's pages (as the engine sizes it, judged per chip against `hbm`) and how they were chosen."""
    one = _per_device(abstract_pages(config, 1, opts.page_size, kv_dtype=opts.kv_cache_dtype, mesh=mesh))
    room = int((1 - aot.HEADROOM) * hbm) - _per_device(state)  # what the weights leave on a chip
    memory, seqs = opts.kv_cache_memory, opts.seqs
    if isinstance(memory, float):
        return max(0, int(memory * room)) // one, f"kv_cache_memory={memory:g} of the {room / 2**30:.2f} GiB left"
    if memory is not None:
        return memory // page_bytes(config, opts.page_size, opts.kv_cache_dtype), f"kv_cache_memory={memory} bytes"
    cap = max(0, int(DEFAULT_FRACTION * room)) // one
    wanted = seqs * per_seq
    how = f"{seqs} sequences x max_model_len" if wanted <= cap else f"{DEFAULT_FRACTION:g} of the memory left"
    return min(wanted, cap), how


def _pool_layout_bytes(pages, formats) -> int | None:
    """Bytes per device of the pool in the layout the step keeps it in (tiles padded), as the compiler counts
    them: a program whose only argument is the pool, in those formats."""
    bump = jax.jit(lambda p: jax.tree.map(lambda x: x.at[(0,) * (x.ndim - 1)].set(0), p), donate_argnums=0,
                   in_shardings=(formats,), out_shardings=formats)
    try:
        return int(bump.lower(pages).compile().memory_analysis().argument_size_in_bytes)
    except Exception:  # noqa: BLE001 (a pool too large for the chip on its own: its size is reported anyway)
        return None


def _compile_engine(config, graphdef, state, mesh, opts: InferenceConfig, hbm: int) -> dict:
    """The engine's pool and step programs for the mesh (see the module docstring); memory reports."""
    max_len = opts.max_model_len or config.max_position_embeddings
    rows, page = opts.seqs, opts.page_size
    per_seq = pages_per_seq(max_len, page)
    num_pages, sizing = _pool_pages(config, mesh, opts, state, hbm, per_seq)
    widths = token_widths(opts.prefill_chunk, rows)
    per_avg = pages_per_seq(opts.average_len, page)
    values = num_pages * page_bytes(config, page, opts.kv_cache_dtype)
    out = {"max_num_seqs": rows, "max_model_len": max_len, "page_size": page, "kv_cache_dtype": opts.kv_cache_dtype,
           "pool": {"pages": num_pages, "tokens": num_pages * page, "bytes": values, "sizing": sizing,
                    "values_bytes_per_token": page_bytes(config, page, opts.kv_cache_dtype) / page},
           "average_len": opts.average_len, "max_concurrent_seqs": min(rows, num_pages // per_avg),
           "pool_holds_max_model_len": num_pages >= per_seq, "programs": 2 * len(widths), "widths": widths}
    if num_pages < max(per_seq, 1):
        return {**out, "steps": {}, "fits": False,
                "compiler": f"not compiled: the pool ({num_pages} pages) cannot hold one sequence of max_model_len "
                            f"{max_len} ({per_seq} pages of {page} tokens)"}
    pages = abstract_pages(config, num_pages, page, kv_dtype=opts.kv_cache_dtype, mesh=mesh)
    weights, pool, allowed = _per_device(state), _per_device(pages), int((1 - aot.HEADROOM) * hbm)
    if weights + pool > allowed:  # nothing to ask the compiler: the arguments alone do not fit
        return {**out, "steps": {}, "fits": False,
                "compiler": f"not compiled: the weights ({weights / 2**30:.2f} GiB) and the pool ({pool / 2**30:.2f} "
                            f"GiB) per chip exceed the {allowed / 2**30:.2f} GiB allowed"}
    with jax.set_mesh(mesh):
        try:  # compiles a step with the pool's layout left to the compiler: the first program that may not fit
            formats = pages_format(graphdef, state, pages, rows=rows, pages_per_row=per_seq)
        except Exception as e:  # noqa: BLE001 (JaxRuntimeError; anything but RESOURCE_EXHAUSTED is re-raised)
            report = aot.exhausted_report(e, (state, pages), hbm)
            if report is None:
                raise
            return {**out, "steps": {"layout": report}, "fits": False, "compiler": report["compiler"]}
        programs = engine_programs(graphdef, state, pages, rows=rows, pages_per_row=per_seq, widths=widths,
                                   formats=formats, mesh=mesh)
        chosen = dict.fromkeys([programs[0][0], programs[-2][0], programs[-1][0]])  # narrowest; widest, both flags
        steps = {name: aot.compile_and_report(step, args[1:], hbm, args[:1])
                 for name, step, args in programs if name in chosen}
        laid_out = _pool_layout_bytes(pages, formats)
    per_device_values = _per_device(pages)
    out["pool"].update(bytes_per_device=per_device_values, laid_out_bytes_per_device=laid_out,
                       layout_ratio=None if laid_out is None else round(laid_out / per_device_values, 4))
    return {**out, "steps": steps, "fits": all(r["fits"] for r in steps.values())}
