"""Ahead-of-time compile of generation for a TPU topology, and its memory verdict.

Inside: `InferenceOptions` (the YAML `inference` section), `inference_options(tree)`,
`compile_decode(tree, topology) -> dict`.

What is compiled (both from a CPU-only machine, for the topology's real TPU executable):
1. The whole generation program `generate._generate_jit` for `batch_size` rows: a prompt of
   max_length - max_new_tokens tokens (rounded down to whole prefill chunks when longer than one),
   prefilled chunk by chunk into a cache of max_length slots, then the decode while-loop for
   max_new_tokens tokens. This is what runs, so its memory is the verdict: `fits` and the top-level
   byte counts are this program's (weights + the cache, which lives inside the program, + the largest
   temporaries of prefill and decode).
2. One decode step (`generate.decode_step`: one token for every row, attending over the full cache)
   with the cache passed in and donated, reported under "decode_step": the steady state of decoding.
   Its cache is compiled with the layout the compiler prefers (`Layout.AUTO`), as inside the loop;
   with the default row-major layout a TPU re-lays out the whole cache around every step.

3. The continuous-batching engine's steps (inference/engine.py) for `batch_size` slots of `max_length`
   tokens, with the cache donated, reported under "engine": its decode step (one token for every slot,
   each at its own length) and its largest prefill calls (prompts' first chunks packed in one row of
   `prefill_chunk` tokens for the engine's default `PREFILL_ROWS` prompts; a long prompt's later chunk
   of `prefill_chunk` tokens), written in place into their cache rows. All are compiled exactly as the
   engine compiles them (`engine.cache_format`, `engine.engine_steps`): the cache in the format the
   decode step prefers, fixed in and out of both steps, so it stays in the compiler's layout between
   steps (the cache crosses a jit boundary every step; a row-major cache would be copied around each).

A program that cannot fit at all (libtpu refuses it: RESOURCE_EXHAUSTED) is reported with `fits: false`
and the compiler's figures (`jaxmodel.aot.compile_and_report`), like one that compiles too large.

Weights are in the model's param_dtype, int8 (`quantize: int8`) or packed int4 with a scale per
`group_size` inputs (`quantize: int4`); the cache in the compute dtype or int8 (`kv_cache_dtype: int8`).
`memory_gib` (optional) is the accelerator memory the config targets when it is smaller than the
topology's chip (the model card's "4-bit on an 8 GB card"): `fits` is then judged against it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, PartitionSpec

from inference.engine import PREFILL_ROWS, SAMPLE, TOP_LOGPROBS, cache_format, engine_steps
from inference.generate import PREFILL_CHUNK, _generate_jit, bucket_length, decode_step
from inference.kv_cache import KV_DTYPES, abstract_cache
from inference.quantize import DEFAULT_GROUP_SIZE, MODES, _nbytes, abstract_quantized_state
from jaxmodel import aot, run_config
from jaxmodel.config import ConfigError
from jaxmodel.model import abstract_model
from jaxmodel.sharding import logical_to_spec, make_mesh


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    batch_size: int = 8
    max_length: int = 4096  # cache slots: prompt + new tokens
    max_new_tokens: int = 64
    quantize: str | None = None  # None, "int8" or "int4" (weights)
    group_size: int = DEFAULT_GROUP_SIZE  # int4: inputs per scale
    kv_cache_dtype: str | None = None  # None (compute dtype) or "int8"
    prefill_chunk: int = PREFILL_CHUNK
    memory_gib: float | None = None  # judge `fits` against this much memory (GiB) instead of the chip's HBM

    def __post_init__(self):
        for name in ("batch_size", "max_length", "max_new_tokens", "prefill_chunk", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.quantize is not None and self.quantize not in MODES:
            raise ValueError(f"quantize={self.quantize!r} is not one of {MODES} (or null)")
        if self.memory_gib is not None and not (isinstance(self.memory_gib, (int, float)) and self.memory_gib > 0):
            raise ValueError(f"memory_gib must be a positive number, got {self.memory_gib!r}")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of {KV_DTYPES}")


def inference_options(tree: dict) -> InferenceOptions:
    return run_config.from_section(InferenceOptions, tree, "inference")


def _sds(shape, dtype, mesh, axes=None):
    spec = PartitionSpec() if axes is None else logical_to_spec(axes, shape, mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def compile_decode(tree: dict, topology: str) -> dict:
    """Compiles generation (and one decode step) for `topology` from a run config; the memory report."""
    where = run_config.where(tree, "inference.max_length")
    config, shape = run_config.model_config(tree), run_config.mesh_shape(tree)
    opts = inference_options(tree)
    if opts.max_length > config.max_position_embeddings:
        raise ConfigError(f"{where}: inference.max_length={opts.max_length} exceeds the context "
                          f"({config.max_position_embeddings})")
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
        report = aot.compile_and_report(_generate_jit, (state, ids, ids, _sds((batch,), jnp.bool_, mesh),
                                                        _sds((vocab,), jnp.bool_, mesh), *scalars), hbm,
                                        (graphdef, False, width, opts.kv_cache_dtype, opts.prefill_chunk))

    cache = abstract_cache(config, batch, opts.max_length, kv_dtype=opts.kv_cache_dtype, mesh=mesh)
    cache_formats = jax.tree.map(lambda s: Format(Layout.AUTO, s.sharding), cache)
    tokens, index = _sds((batch,), jnp.int32, mesh, ("batch",)), _sds((), jnp.int32, mesh)
    step = jax.jit(decode_step.__wrapped__, static_argnums=0, donate_argnums=3,
                   in_shardings=(jax.tree.map(lambda s: s.sharding, state), tokens.sharding, cache_formats,
                                 index.sharding),
                   out_shardings=(None, cache_formats))
    with jax.set_mesh(mesh):
        step_report = aot.compile_and_report(step, (state, tokens, cache, index), hbm, (graphdef,))

    engine = _compile_engine(graphdef, state, cache, mesh, batch, opts, hbm)
    nbytes = lambda tree: sum(_nbytes(x) for x in jax.tree.leaves(tree))  # noqa: E731 (int4: half a byte)
    return {"mode": "decode", "topology": topology, "devices": len(devices), "device_kind": devices[0].device_kind,
            "mesh": dict(mesh.shape), "batch_size": batch, "max_length": opts.max_length, "prompt_length": prompt,
            "new_tokens": width, "prefill_chunk": opts.prefill_chunk, "quantize": opts.quantize,
            "group_size": opts.group_size if opts.quantize == "int4" else None,
            "kv_cache_dtype": opts.kv_cache_dtype, "param_bytes_total": nbytes(state),
            "cache_bytes_total": nbytes(cache), **report, "decode_step": step_report, "engine": engine}


def _engine_does_not_fit(error, state, cache, slots: int, opts: InferenceOptions, hbm: int) -> dict:
    """The engine's report when its decode step cannot even be compiled (libtpu: RESOURCE_EXHAUSTED)."""
    report = aot.exhausted_report(error, (state, cache), hbm)
    if report is None:
        raise error
    skipped = {"device_bytes": None, "fits": False, "compiler": "not compiled (the decode step does not fit)"}
    return {"slots": slots, "max_model_len": opts.max_length, "top_logprobs": TOP_LOGPROBS, "decode_step": report,
            "prefill_step": {"rows": 1, "chunk": opts.prefill_chunk, **skipped},
            "prefill_step_first_chunk": {"prompts": min(PREFILL_ROWS, slots), "packed_tokens": opts.prefill_chunk,
                                         **skipped},
            "fits": False}


def _compile_engine(graphdef, state, cache, mesh, slots: int, opts: InferenceOptions, hbm: int) -> dict:
    """The engine's decode step and its largest prefill calls, compiled for the mesh; memory reports."""
    vec = lambda n, dt: _sds((n,), dt, mesh)  # noqa: E731  (small per-row vectors: replicated)
    sampling = lambda n: (vec(n, jnp.float32), vec(n, jnp.int32), vec(n, jnp.float32), vec(n, jnp.int32),  # noqa: E731
                          vec(n, jnp.int32))
    with jax.set_mesh(mesh):
        try:  # compiles the decode step to learn the cache's layout: the first program that may not fit
            formats = cache_format(graphdef, state, cache, slots)
        except Exception as e:  # noqa: BLE001 (JaxRuntimeError; anything but RESOURCE_EXHAUSTED is re-raised)
            return _engine_does_not_fit(e, state, cache, slots, opts, hbm)
        leaves, treedef = jax.tree.flatten(state)
        decode_step, prefill_step, packed_step = engine_steps(formats, graphdef, treedef)
        decode = aot.compile_and_report(decode_step, (leaves, cache, vec(slots, jnp.int32), vec(slots, jnp.int32),
                                                      vec(slots, jnp.bool_), vec(slots, jnp.bool_),
                                                      *sampling(slots), vec(slots, jnp.int32),
                                                      _sds((), jnp.bool_, mesh)), hbm, (SAMPLE,))
        flag = _sds((), jnp.bool_, mesh)
        # Prompts' first chunks packed in one row of prefill_chunk tokens (each attends over itself) ...
        rows = min(PREFILL_ROWS, slots)
        tokens = vec(opts.prefill_chunk, jnp.int32)
        first = aot.compile_and_report(packed_step, (leaves, cache, vec(rows, jnp.int32), vec(rows, jnp.int32), tokens,
                                                     tokens, tokens, tokens, *sampling(rows), flag), hbm,
                                       (SAMPLE, False, None))  # the whole row masked: the larger program
        # ... and a long prompt's later chunk (over the filled cache blocks).
        chunk = _sds((1, opts.prefill_chunk), jnp.int32, mesh)
        prefill = aot.compile_and_report(prefill_step, (leaves, cache, vec(1, jnp.int32), chunk, chunk,
                                                        vec(1, jnp.int32), chunk, *sampling(1), flag), hbm,
                                         (SAMPLE, False))
    return {"slots": slots, "max_model_len": opts.max_length, "top_logprobs": TOP_LOGPROBS,
            "decode_step": decode, "prefill_step": {"rows": 1, "chunk": opts.prefill_chunk, **prefill},
            "prefill_step_first_chunk": {"prompts": rows, "packed_tokens": opts.prefill_chunk, **first},
            "fits": bool(decode["fits"] and prefill["fits"] and first["fits"])}
