"""Checkpoint reading: Hugging Face directories, `import-hf` directories, training checkpoint steps.

Inside:
- `from_pretrained(path, *, dtype, mesh=None)`: a model from a Hugging Face directory (single or sharded
  safetensors; `.bin` only with `allow_pickle=True`) or from a directory written by `import_hf`.
- `load_hf_state`: the flat model state read from a Hugging Face directory, placed per a mesh;
  `TensorTransform`: a per-tensor hook applied while reading (how inference quantizes at load time).
- `import_hf(hf_dir, ckpt_dir)`: the CLI's conversion into an Orbax checkpoint.
- `tensor_reader`, `config_source`, `flat_arrays`, `orbax_target` / `check_orbax_metadata`: the readers
  and checks the writing direction (`jaxmodel.export`: `save_pretrained`, `export_hf`) uses too; this
  module does not import it.
- `resolve_lora(path, config)`: a PEFT adapter directory (local, gs:// or hub id) checked against a
  config (peft_type, target modules, every tensor's shape), nothing loaded: what `--lora` checks first.
- `copy_tokenizer_files`: the tokenizer files a complete model directory carries.
The key table and per-tensor layout changes live in `jaxmodel/weights.py`; paths and never-half-written
outputs in `jaxmodel/storage.py`. About 530 lines, this docstring a tenth of them: reading is one pipeline
(header checks -> per-process placement -> load-time transforms) that reads best in one file.

Streaming. Every check (missing, unexpected, duplicate keys, shapes, dtypes, truncation) runs on the
headers before any tensor is converted. Arrays are then built in their sharding from each process's
own slices (`_place`): a process reads only the region of each tensor its devices hold (for a stacked
parameter, that region of every layer's tensor), as sliced reads of the safetensors files
(`HFTensor.read_box` maps the JAX box through the transpose/reshape to the HF rows and columns), so on
a pod each host reads about its share of the checkpoint, not all of it; one process reads everything,
through the same code. Host memory: this process's share of one parameter. Load-time transforms
(below) convert whole tensors, so they read each tensor whole on every process. `import_hf` writes through
`storage.atomic_directory`, so a failure leaves nothing half-written.

Paths: every directory here is local or a `gs://` URL (`jaxmodel.storage`; safetensors through range
reads and streamed uploads, Orbax arrays through TensorStore's own GCS driver). A directory whose write
was interrupted on an object store (`_WRITING` without `_COMMITTED`) is refused by name.
Every model path may also be a Hugging Face model id (`org/name[@revision]`), resolved by `jaxmodel.hub`
into the local hub cache.

Transforms (`load_hf_state(transform=...)`). jaxmodel knows nothing of quantization (inference owns it),
so the loader takes a hook: for each parameter, `transform(path, abstract_var)` returns None (load as is)
or a `TensorTransform`: the parts the parameter is stored as (e.g. int8 values and float32 scales, with
their full shapes), `convert` (one source tensor, a layer slice of a stacked parameter, in the load
dtype -> its parts) and `combine` (the placed parts -> the value the model holds, e.g. a QArray). Each
part is placed by the parameter's logical axes applied to the part's shape. Stacked parts are built on
the device: a buffer per part is allocated there and each converted layer slice is written into it in
place (a donated dynamic-update-slice), so the host holds one source slice and its converted parts at a
time, never a stacked array, and the device never holds the source dtype. With `chunk_elements` set, the
source itself is read in pieces of at most that many values (row ranges of the file's tensor, i.e. index
ranges of its first output axis: axis `in_dims` of a Linear's JAX layout, axis 0 of an embedding), each
converted and written into the part buffers on its own: the host then holds one piece, not one tensor
(the embedding and lm_head are each larger than a layer). `convert` must then treat pieces along that
axis independently and return parts split along the same axis (true of per-output-channel and per-group
quantization, whose reductions run over input axes).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxmodel import storage
from jaxmodel.config import ConfigError, MistralConfig
from jaxmodel.hub import resolve_adapter, resolve_model
from jaxmodel.lora import check_peft_adapter
from jaxmodel.model import MistralForCausalLM, abstract_model
from jaxmodel.orbax_stream import trim_malloc, tune_malloc
from jaxmodel.safetensors_io import WeightFileError, WeightFiles
from jaxmodel.storage import atomic_directory
from jaxmodel.weights import WEIGHT_RULES, ConvertError, check_files, expected_hf_tensors, param_shapes

# The model-directory layout this module reads (the trainer writes its checkpoint steps to it):
# config.json (or, instead, an Orbax JSON item MODEL_CONFIG_ITEM holding the same dict) and
# either Hugging Face safetensors or an Orbax PyTree of the parameters in PARAMS_DIR.
PARAMS_DIR = "params"  # the Orbax checkpoint inside an import_hf directory or a training checkpoint step
MODEL_CONFIG_ITEM = "model_config"  # an Orbax JSON item holding config.json's dict (training checkpoint steps)
DEFAULT_SHARD_BYTES = 5 * 1024**3


def _bounds(index, shape) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _regions(boxes: set, shape) -> list[tuple[tuple[int, int], ...]]:
    """What this process reads of one parameter: the bounding box of its devices' (distinct, disjoint)
    boxes when they tile it exactly (one read; the whole parameter on one process), else each box."""
    boxes = sorted(boxes)
    bbox = tuple((min(b[k][0] for b in boxes), max(b[k][1] for b in boxes)) for k in range(len(shape)))
    volume = lambda box: int(np.prod([b - a for a, b in box], dtype=np.int64))
    return [bbox] if volume(bbox) == sum(map(volume, boxes)) else boxes


def _place(shape, dtype, sharding, read: Callable[[int | None, tuple], np.ndarray], layers: int | None) -> jax.Array:
    """Builds one parameter directly in its sharding, reading only this process's slices of the files.

    read(layer, box) returns a box [(start, stop) per dim] of layer i's tensor in JAX layout (layer None:
    a parameter without a layer axis). This process reads the region its devices hold (`_regions`), layer
    by layer for stacked parameters; each device then takes its index of that region
    (`jax.make_array_from_callback`), so replicas share one read. Host memory: this process's share of
    the parameter being built, never the whole model; bytes read: that share (all of it on one process)."""
    regions = _regions({_bounds(i, shape) for i in sharding.addressable_devices_indices_map(shape).values()}, shape)
    data = {}
    for region in regions:
        if layers is None:
            data[region] = np.asarray(read(None, region), dtype=dtype)
            continue
        (first, stop), rest = region[0], region[1:]
        data[region] = np.empty([b - a for a, b in region], dtype)
        for layer in range(first, stop):
            data[region][layer - first] = read(layer, rest)

    def shard(index):
        box = _bounds(index, shape)
        region = next(r for r in regions if all(a <= x and y <= b for (a, b), (x, y) in zip(r, box)))
        return data[region][tuple(slice(x - a, y - a) for (a, _), (x, y) in zip(region, box))]

    return jax.make_array_from_callback(shape, sharding, shard, dtype=dtype)


def _open_checked(path: str, config: MistralConfig, allow_pickle: bool):
    """The directory's weight files, validated against the config before any tensor is read:
    (files, {hf name: tensor rule}, {(state path, layer): (hf name, tensor rule)})."""
    try:
        files = WeightFiles.open(path, allow_pickle=allow_pickle)
    except WeightFileError as e:
        raise ConvertError(str(e)) from None
    expected = expected_hf_tensors(config)
    check_files(files, expected, config, path)
    return files, expected, {(t.rule.path, t.layer): (name, t) for name, t in expected.items()}


def check_hf_weights(path: str, config: MistralConfig, *, allow_pickle: bool = False) -> None:
    """Checks a Hugging Face directory's weight files against `config` from their headers (missing,
    unexpected or misshapen tensors, truncated files): a ConvertError naming the file, no tensor read."""
    _open_checked(path, config, allow_pickle)



@dataclasses.dataclass(frozen=True)
class TensorTransform:
    """How one parameter is stored once loaded (see the module docstring)."""

    parts: dict[str, tuple[tuple[int, ...], Any]]  # part -> (full shape, layer axis included; dtype)
    convert: Callable[[np.ndarray], dict[str, np.ndarray]]  # a source slice -> its parts (no layer axis)
    combine: Callable[[dict[str, jax.Array]], Any]  # placed parts -> the model's value
    chunk_elements: int | None = None  # read and convert the source in pieces of at most this many values


def load_hf_state(path: str, config: MistralConfig, *, mesh=None, allow_pickle=False, progress=True,
                  transform: Callable[[tuple, Any], TensorTransform | None] | None = None):
    """The model state (flat {path: jax.Array, or what a transform combines}) read from a Hugging Face
    directory."""
    files, expected, by_slot = _open_checked(path, config, allow_pickle)
    if transform is not None:
        # Freed pieces and slices go back to the OS instead of raising glibc's dynamic mmap threshold and
        # piling up in the heap (as in tensor_reader); measured in BENCHMARKS.md's streaming-quantization rows.
        tune_malloc()
    sharding_of = _sharding_fn(mesh)
    _, abstract = nnx.split(abstract_model(config))
    arrays = {}
    with tqdm(total=len(expected), desc="loading tensors", unit="tensor", disable=not progress) as bar:
        for p, var in nnx.to_flat_state(abstract):
            p = tuple(str(x) for x in p)
            stacked = p[0] == "layers"

            def read(layer, box, p=p):
                name, t = by_slot[(p, layer)]
                return t.read_box(lambda index: files.get_slice(name, index), box)

            def pieces(layer, max_elements, p=p):
                name, t = by_slot[(p, layer)]
                return _pieces(files, name, t, max_elements)

            layers = config.num_hidden_layers if stacked else None
            plan = transform(p, var) if transform is not None else None
            if plan is None:
                arrays[p] = _place(var.shape, var.dtype, sharding_of(p, var), read, layers)
            else:  # a transform converts whole tensors, read in pieces of rows (see _pieces)
                rule = by_slot[(p, 0 if stacked else None)][1].rule
                axis = rule.in_dims or 0  # the first output axis of a slice (see _pieces)
                arrays[p] = plan.combine(_place_parts(plan, var, mesh, pieces, layers, axis))
                trim_malloc()
            bar.update(layers or 1)
    files.close()
    return arrays


def _part_sharding(var, shape, mesh):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    from jaxmodel.sharding import auto_mesh, logical_to_spec

    mesh = auto_mesh(mesh)
    return jax.sharding.NamedSharding(mesh, logical_to_spec(tuple(var.get_metadata()["out_sharding"]), shape, mesh))


def _pieces(files: WeightFiles, name: str, t, max_elements: int | None):
    """(start, piece) pairs covering tensor `name` in JAX layout, split along its first output axis (axis
    `in_dims` of a Linear, whose file rows are its flattened outputs; axis 0 otherwise) into pieces of at
    most `max_elements` values (at least one index each); one piece, the whole tensor, when it fits or
    `max_elements` is None. Each piece is one range read of its rows."""
    shape, k = t.jax_shape, t.rule.in_dims
    axis = k or 0
    n = shape[axis]
    step = n if max_elements is None else max(1, max_elements // (int(np.prod(shape)) // n))
    if step >= n:
        yield 0, t.to_jax(files.get(name))
        return
    rows_per_index = 1 if k is None else int(np.prod(shape[axis + 1:]))
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = files.get_rows(name, start * rows_per_index, stop * rows_per_index)
        yield start, rows if k is None else rows.T.reshape(shape[:k] + (stop - start,) + shape[k + 1:])
        del rows


@functools.cache
def _zeros(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.cache
def _writer(sharding):
    """buffer, piece, start indices -> the buffer with the piece written there (donated: in place)."""
    return jax.jit(lambda buf, x, starts: jax.lax.dynamic_update_slice(buf, x, starts), donate_argnums=0,
                   out_shardings=sharding)


def _place_parts(plan: TensorTransform, var, mesh, pieces, layers: int | None, axis: int) -> dict[str, jax.Array]:
    """The parts of one transformed parameter, built on the device: a buffer per part, written in place.

    A stacked parameter's pieces are assembled on the host into one layer slice per part (the converted
    slice, e.g. int8 values: half a bfloat16 slice or less), then written as one update per layer: XLA's
    CPU backend updates a sub-byte (int4) buffer in place but with a pass over the whole buffer, so one
    write per layer, not per piece. An unstacked parameter's pieces (the embedding, lm_head: larger
    than a layer) go straight into the device buffer, one update each."""
    shardings = {k: _part_sharding(var, shape, mesh) for k, (shape, _) in plan.parts.items()}
    buffers = {k: _zeros(tuple(shape), np.dtype(dtype), shardings[k])() for k, (shape, dtype) in plan.parts.items()}

    def write(k, value, starts):
        # Placed by the part's rules applied to the value's shape (the layer axis is never sharded, so a
        # whole slice lands as before; a smaller piece is replicated where the mesh does not divide it, and
        # the update writes each device's share into its own shard).
        one = _place(value.shape, value.dtype, _part_sharding(var, value.shape, mesh),
                     lambda _, box: _cut(value, box), None)
        buffers[k] = _writer(shardings[k])(buffers[k], one, tuple(jnp.int32(i) for i in starts))

    if layers is None:
        for start, piece in pieces(None, plan.chunk_elements):
            parts = plan.convert(np.asarray(piece, dtype=var.dtype))
            del piece
            for k in plan.parts:
                starts = [0] * parts[k].ndim
                starts[axis] = start
                write(k, np.asarray(parts[k], dtype=plan.parts[k][1]), starts)
            del parts
        return buffers
    for layer in range(layers):
        slices = {k: np.empty(shape[1:], dtype) for k, (shape, dtype) in plan.parts.items()}
        for start, piece in pieces(layer, plan.chunk_elements):
            parts = plan.convert(np.asarray(piece, dtype=var.dtype))
            for k, value in parts.items():
                index = [slice(None)] * value.ndim
                index[axis] = slice(start, start + value.shape[axis])
                slices[k][tuple(index)] = value
            del piece, parts
        for k, value in slices.items():
            write(k, value[None], [layer] + [0] * value.ndim)
        del slices
    return buffers


def _cut(value: np.ndarray, box) -> np.ndarray:
    return value[tuple(slice(a, b) for a, b in box)]


def _sharding_fn(mesh):
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return lambda path, var: single
    from jaxmodel import sharding  # the mesh rules (sharding issue)

    return lambda path, var: sharding.param_sharding(var, mesh)


def _merge(config: MistralConfig, arrays: dict) -> MistralForCausalLM:
    graphdef, abstract = nnx.split(abstract_model(config))
    flat = nnx.to_flat_state(abstract)
    for path, var in flat:
        var.set_value(arrays[tuple(str(x) for x in path)])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(
    path: str,
    *,
    dtype=jnp.float32,
    compute_dtype=None,
    mesh=None,
    allow_pickle: bool = False,
    progress: bool = True,
    revision: str | None = None,
    transform=None,
    **options,
) -> MistralForCausalLM:
    """Loads a Hugging Face directory or model id (`org/name`, `org/name@revision`), an `import_hf`
    directory, or a training checkpoint step (`WORKDIR/checkpoints/STEP`) into a `MistralForCausalLM`.

    dtype: parameter dtype; compute_dtype: activation dtype (default: dtype); options: other
    MistralConfig model options (attention_impl, remat, scan_layers). transform: a per-tensor hook
    (see `load_hf_state`; Hugging Face directories only)."""
    path = resolve_model(path, revision=revision, allow_pickle=allow_pickle)
    path = storage.check_input_dir(path, "model directory")
    config = MistralConfig.from_hf(
        config_source(path), param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(compute_dtype or dtype).name,
        **options
    )
    if storage.isdir(storage.join(path, PARAMS_DIR)):
        if transform is not None:
            raise ConvertError(f"{path}: load-time transforms read Hugging Face directories, not Orbax ones")
        arrays = _restore_orbax(storage.join(path, PARAMS_DIR), config, mesh)
    else:
        arrays = load_hf_state(path, config, mesh=mesh, allow_pickle=allow_pickle, progress=progress,
                               transform=transform)
    return _merge(config, arrays)


def flat_arrays(model: MistralForCausalLM) -> dict[tuple[str, ...], jax.Array]:
    """The model's arrays by state path (strings): what `_merge` takes back."""
    _, state = nnx.split(model)
    return {tuple(str(x) for x in p): v.get_value() for p, v in nnx.to_flat_state(state)}


# -- Orbax side (normistral import-hf / export-hf) ------------------------------------------------------------


def import_hf(hf_dir: str, ckpt_dir: str, *, allow_pickle: bool = False, progress: bool = True) -> None:
    """Hugging Face directory -> `ckpt_dir/config.json` + an Orbax checkpoint in `ckpt_dir/params`,
    written slice by slice (peak host memory ~ one layer tensor, independent of the layer count)."""
    from jaxmodel.orbax_stream import save_streaming

    hf_dir = resolve_model(hf_dir, allow_pickle=allow_pickle)
    storage.check_input_dir(hf_dir, "Hugging Face model directory")
    storage.check_output_dir(ckpt_dir)  # before any tensor is read
    config = MistralConfig.from_hf(hf_dir)
    files, expected, by_slot = _open_checked(hf_dir, config, allow_pickle)
    shapes = param_shapes(config)
    dtype = config.weight_dtype if config.torch_dtype == "float32" else jnp.dtype(config.torch_dtype)
    abstract: dict = {}
    for p, shape in shapes.items():
        node = abstract
        for key in p[:-1]:
            node = node.setdefault(key, {})
        node[p[-1]] = jax.ShapeDtypeStruct(shape, dtype)

    def fill(path, index):
        name, t = by_slot[(tuple(path), index)]
        # A transposed view of the read buffer, no copy: TensorStore copes with the strides chunk by chunk.
        return t.to_jax(files.get(name)).astype(dtype, copy=False)

    with atomic_directory(ckpt_dir) as tmp:
        storage.write_json(storage.join(tmp, "config.json"), config.to_hf())
        copy_tokenizer_files(hf_dir, tmp)  # a complete model directory: Generator.from_pretrained reads it
        with tqdm(total=len(expected), desc="importing tensors", unit="tensor", disable=not progress) as bar:
            save_streaming(storage.join(tmp, PARAMS_DIR), abstract, fill, progress=bar.update)
    files.close()


def orbax_target(config: MistralConfig, sharding_of=None) -> dict:
    """The nested tree of abstract arrays an Orbax params/ item restores into (with shardings if given)."""
    _, abstract = nnx.split(abstract_model(config))
    target: dict = {}
    for p, var in nnx.to_flat_state(abstract):
        p = tuple(str(x) for x in p)
        node = target
        for key in p[:-1]:
            node = node.setdefault(key, {})
        sharding = None if sharding_of is None else sharding_of(p, var)
        node[p[-1]] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)
    return target


def _restore_orbax(params_dir: str, config: MistralConfig, mesh) -> dict:
    import orbax.checkpoint as ocp

    target = orbax_target(config, _sharding_fn(mesh))
    checkpointer = ocp.StandardCheckpointer()
    check_orbax_metadata(checkpointer, params_dir, target)
    try:
        restored = checkpointer.restore(storage.resolve(params_dir), target)
    except Exception as e:  # noqa: BLE001 (TensorStore raises bare Exceptions for unreadable chunks)
        first = (str(e).splitlines() or [type(e).__name__])[0].split(" See full TensorStore details")[0]
        raise ConvertError(f"{params_dir}: cannot restore the Orbax checkpoint, its files are truncated or "
                           f"corrupt ({first[:300]})") from None
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
            else:
                out[prefix + (k,)] = v

    walk(restored, ())
    return out


def check_orbax_metadata(checkpointer, params_dir: str, target: dict) -> None:
    """Compares the stored shapes with the config before any array is read: a restore that fails half-way
    leaves TensorStore callbacks behind that print a stray traceback when the process exits."""
    try:
        stored = checkpointer.metadata(storage.resolve(params_dir)).item_metadata
        stored = {tuple(str(getattr(k, "key", k)) for k in path): leaf
                  for path, leaf in jax.tree_util.tree_leaves_with_path(stored)}
    except Exception as e:  # noqa: BLE001 (missing or corrupt _METADATA: Orbax raises several kinds)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConvertError(f"{params_dir}: not a readable Orbax checkpoint ({first[:300]})") from None
    if not stored:
        raise ConvertError(f"{params_dir}: not a readable Orbax checkpoint (its _METADATA or manifest is missing, "
                           "truncated or corrupt)")
    config_json = storage.join(storage.parent(params_dir), "config.json")
    config_json = config_json if storage.isfile(config_json) else "the saved model config"
    wanted = {path: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
    for path, leaf in wanted.items():
        key = tuple(str(getattr(k, "key", k)) for k in path)
        name = ".".join(key)
        if key not in stored:
            raise ConvertError(f"{params_dir}: the checkpoint has no array {name}")
        shape = tuple(getattr(stored[key], "shape", ()) or ())
        if shape != tuple(leaf.shape):
            raise ConvertError(f"{params_dir}: array {name} has shape {shape}, {config_json} implies "
                               f"{tuple(leaf.shape)}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copies the tokenizer (and generation config) files a model directory carries; returns their names."""
    present = set(storage.listdir(src))
    names = [n for n in TOKENIZER_FILES if n in present]
    for name in names:
        storage.copy_file(storage.join(src, name), storage.join(dst, name))
    return names


def config_source(path: str):
    """Where a model directory's config lives: its config.json, or, in a directory without one (a
    training checkpoint step), the Orbax JSON item MODEL_CONFIG_ITEM beside params/ (read by Orbax)."""
    item = storage.join(path, MODEL_CONFIG_ITEM)
    if not storage.exists(storage.join(path, "config.json")) and storage.isdir(item):
        import orbax.checkpoint as ocp
        from etils import epath

        return dict(ocp.JsonCheckpointHandler().restore(epath.Path(item)))
    return path


def tensor_reader(path: str, config: MistralConfig, *, allow_pickle: bool = False):
    """read(state path, layer, box=None) -> one parameter's tensor in JAX layout (layer i's slice of a
    stacked one, `layer=None` for the others; only the box [(start, stop) per dim] of it when given),
    straight from the files: an `import_hf` directory or a training
    checkpoint step (its Orbax `params/`, sliced reads through TensorStore), or a Hugging Face directory
    (memory-mapped safetensors). Nothing is cached: host memory holds what the caller keeps."""
    tune_malloc()  # freed tensors go back to the OS instead of piling up in TensorStore threads' arenas
    params = storage.join(path, PARAMS_DIR)
    if storage.isdir(params):
        import tensorstore as ts

        opened: dict = {}
        url = storage.resolve(params)
        base = (url if storage.is_remote(url) else f"file://{url}") + "/"
        ocdbt = storage.exists(storage.join(params, "manifest.ocdbt"))  # object stores: plain zarr (orbax_stream)

        def read(p, layer, box=None):
            if p not in opened:  # Orbax's layout: zarr arrays named by the dotted tree path (in one OCDBT store)
                name = ".".join(p)
                kvstore = {"driver": "ocdbt", "base": base, "path": name} if ocdbt else base + name + "/"
                spec = {"driver": "zarr", "kvstore": kvstore}
                try:
                    opened[p] = ts.open(spec, open=True, read=True).result()
                except ValueError as e:
                    raise ConvertError(f"{params}: cannot read {'.'.join(p)} ({str(e).splitlines()[0]})") from None
            array = opened[p] if layer is None else opened[p][layer]
            if box is not None:
                array = array[tuple(slice(a, b) for a, b in box)]
            try:
                return np.asarray(array.read().result())
            except Exception as e:  # noqa: BLE001 (TensorStore raises bare Exceptions for unreadable chunks)
                first = (str(e).splitlines() or [type(e).__name__])[0].split(" See full TensorStore details")[0]
                raise ConvertError(f"{params}: cannot read {'.'.join(p)}, the Orbax checkpoint's files are "
                                   f"truncated or corrupt ({first[:300]})") from None

        return read
    files, _, by_slot = _open_checked(path, config, allow_pickle)

    def read(p, layer, box=None):
        name, t = by_slot[(tuple(p), layer)]
        if box is None:
            return t.to_jax(files.get(name))
        return t.read_box(lambda index: files.get_slice(name, index), box)

    return read


def resolve_lora(path: str, config: MistralConfig) -> str:
    """The local (or gs://) directory of a PEFT adapter (a hub id fetched into the cache), checked against
    `config` on an abstract model: a LoraError (one line) for anything `load_peft_adapter` would refuse."""
    path = resolve_adapter(path)
    check_peft_adapter(abstract_model(config), path)
    return path



__all__ = [
    "ConvertError",
    "ConfigError",
    "WEIGHT_RULES",
    "expected_hf_tensors",
    "from_pretrained",
    "import_hf",
    "load_hf_state",
    "check_hf_weights",
    "TensorTransform",
]
