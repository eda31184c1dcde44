"""Checkpoint writing: a model or a checkpoint directory -> a Hugging Face directory (`export-hf`).

Inside:
- `save_pretrained(model, path)`: a Hugging Face directory (config.json, sharded safetensors, index)
  that `transformers.AutoModelForCausalLM.from_pretrained` loads, from a model in memory (any mesh).
- `export_hf(ckpt_dir, hf_dir, merge_lora=None)`: the CLI's conversion from an `import-hf` directory or a
  training checkpoint step (`merge_lora`: a PEFT adapter folded into the weights as they stream out).
The reading direction (Hugging Face and Orbax directories -> a model) is `jaxmodel.convert`, whose
readers (`tensor_reader`, `config_source`) and Orbax checks this module uses; convert does not import it.

Streaming: one tensor per write. `export_hf` reads each slice straight from the Orbax files with
TensorStore, the largest in blocks of HF rows, so the embedding and head are never whole in host memory;
`save_pretrained` gathers one slice of a sharded model at a time (every process takes part in each gather,
process 0 writes). Outputs go through `storage.atomic_directory`, so a failure leaves nothing half-written;
the destination is checked before any tensor is read.
"""

from __future__ import annotations

from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxmodel import storage
from jaxmodel.config import MistralConfig
from jaxmodel.convert import (
    DEFAULT_SHARD_BYTES,
    PARAMS_DIR,
    check_orbax_metadata,
    config_source,
    copy_tokenizer_files,
    flat_arrays,
    orbax_target,
    tensor_reader,
)
from jaxmodel.hub import resolve_adapter, resolve_model
from jaxmodel.lora import PeftDeltas
from jaxmodel.model import MistralForCausalLM, abstract_model
from jaxmodel.orbax_stream import trim_malloc
from jaxmodel.safetensors_io import SafetensorsWriter, shard_plan
from jaxmodel.storage import atomic_directory
from jaxmodel.weights import expected_hf_tensors

EXPORT_BLOCK_BYTES = 16 * 2**20  # export-hf reads and writes each tensor in HF row blocks of about this size


def save_pretrained(
    model: MistralForCausalLM,
    path: str,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> None:
    """Writes a Hugging Face directory; tensors are stored in `dtype` (default: the config's torch_dtype,
    i.e. the dtype the imported checkpoint had, which makes HF -> JAX -> HF bit-exact).

    From any mesh and any number of processes: each tensor (each layer's slice of a stacked parameter)
    is gathered to the host on its own, written, and dropped, so host memory holds one tensor, not the
    model. Every process takes part in each gather (a collective); process 0 writes."""
    arrays = flat_arrays(model)

    def read(t, box):  # whole tensors (box None): one gather each
        value = arrays[t.rule.path]
        return _to_host(value if t.layer is None else value[t.layer])

    _write_hf(model.config, path, read, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress)


def _row_blocks(t, block_bytes: int | None):
    """[start, stop) ranges of HF rows, whole `row_unit`s of at most ~block_bytes (float32) each."""
    rows = t.hf_shape[0] if t.hf_shape else 1
    if block_bytes is None or len(t.hf_shape) < 2:
        return [(0, rows)]
    unit = t.row_unit
    step = unit * max(1, block_bytes // (4 * int(np.prod(t.hf_shape[1:])) * unit))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _write_hf(config: MistralConfig, path: str, read, *, dtype, max_shard_bytes: int, progress: bool,
              block_bytes: int | None = None) -> None:
    """The Hugging Face directory writer behind save_pretrained and export_hf: `read(hf tensor, box)` gives
    that tensor (a layer's slice for stacked parameters) in JAX layout, one call at a time: whole (box
    None) or, with block_bytes, one block of its HF rows at a time (`HFTensor.rows_box`), so the largest
    tensors (embedding, lm_head) never sit whole in host memory."""
    dtype = np.dtype(jnp.dtype(dtype or config.torch_dtype))
    tensors = expected_hf_tensors(config)
    specs = {name: (t.hf_shape, dtype) for name, t in tensors.items()}
    shards = list(shard_plan(specs, max_shard_bytes))
    # Multi-process runs: every process takes part in gathering each tensor (a collective); process 0 writes.
    primary = jax.process_index() == 0
    with atomic_directory(path) if primary else nullcontext() as tmp:
        if primary:
            storage.write_json(storage.join(tmp, "config.json"),
                               config.replace(torch_dtype=jnp.dtype(dtype).name).to_hf())
        weight_map, total = {}, 0
        with tqdm(total=len(tensors), desc="writing tensors", unit="tensor", disable=not (progress and primary)) as bar:
            for k, names in enumerate(shards):
                file = (
                    "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                )
                specs_k = {n: specs[n] for n in names}
                with SafetensorsWriter(storage.join(tmp, file), specs_k) if primary else nullcontext() as writer:
                    for name in names:
                        t = tensors[name]
                        for start, stop in _row_blocks(t, block_bytes):
                            hf = t.to_hf(read(t, None if block_bytes is None else t.rows_box(start, stop)))
                            hf = hf.astype(dtype, copy=False)
                            if writer is not None:
                                writer.write_rows(name, hf)
                            total += hf.nbytes
                            del hf
                            trim_malloc()
                        weight_map[name] = file
                        bar.update(1)
        if primary:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            storage.write_json(storage.join(tmp, "model.safetensors.index.json"), index)


def _to_host(value) -> np.ndarray:
    """A (possibly multi-process) jax.Array as one host array; a collective when not fully addressable."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(jax.device_get(value))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))



def export_hf(ckpt_dir: str, hf_dir: str, *, dtype: str | None = None, progress: bool = True,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, block_bytes: int = EXPORT_BLOCK_BYTES,
              merge_lora: str | None = None) -> None:
    """An `import_hf` directory or a training checkpoint step (or a Hugging Face directory) -> a Hugging
    Face directory, streamed: each tensor (each layer's slice of a stacked one) is read from the files,
    converted and written on its own (in HF row blocks of about block_bytes), so host memory holds about one
    block whatever the model's size. merge_lora: a PEFT adapter directory (or hub id), checked before any
    tensor is read, whose scale * A @ B is added to each target projection in float32 (the block's rows of
    A and B only) before the cast to `dtype`: PEFT's merge_and_unload, then save_pretrained."""
    ckpt_dir = resolve_model(ckpt_dir)
    ckpt_dir = storage.check_input_dir(ckpt_dir, "checkpoint directory (import-hf output or WORKDIR/checkpoints/STEP)")
    storage.check_output_dir(hf_dir)  # before the weights load: a bad destination fails at once
    config = MistralConfig.from_hf(config_source(ckpt_dir))
    deltas = PeftDeltas(abstract_model(config), resolve_adapter(merge_lora)) if merge_lora is not None else None
    try:
        _export(ckpt_dir, hf_dir, config, deltas, dtype=dtype, max_shard_bytes=max_shard_bytes,
                progress=progress, block_bytes=block_bytes)
    finally:
        if deltas is not None:
            deltas.close()


def _export(ckpt_dir, hf_dir, config, deltas, *, dtype, max_shard_bytes, progress, block_bytes) -> None:
    params_dir = storage.join(ckpt_dir, PARAMS_DIR)
    if storage.isdir(params_dir):  # shapes vs config.json from the metadata, before any array is read
        import orbax.checkpoint as ocp

        check_orbax_metadata(ocp.StandardCheckpointer(), params_dir, orbax_target(config))
    read = tensor_reader(ckpt_dir, config)

    def merged(t, box):
        value = read(t.rule.path, t.layer, box)
        delta = None if deltas is None else deltas(t.rule.path, t.layer, box)
        return value if delta is None else value.astype(np.float32) + delta

    _write_hf(config, hf_dir, merged, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress,
              block_bytes=block_bytes)
    if jax.process_index() == 0:
        copy_tokenizer_files(ckpt_dir, hf_dir)
