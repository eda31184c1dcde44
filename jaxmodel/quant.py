"""Weight-only quantization: int8 (per output channel) and int4 (per group), dequantized in the matmul.

It lives in jaxmodel/ because both inference (quantized serving) and training (QLoRA: a frozen quantized
base under LoRA adapters) use it; `inference.quantize` re-exports every name.

Inside: `QArray` (integer values + float32 scales, a pytree), `MODES` / `DEFAULT_GROUP_SIZE`, `QUANTIZED`
(which parameters, and which of their axes are inputs), `quantize_array`, `quantize_numpy` (the same on the
host), `quantized_shapes`, `load_transform` (streaming quantization while loading), `quantize_model`,
`abstract_quantized_state`, `param_bytes`.

How it plugs into the model without changing it: the model reads every weight as
`self.w[...].astype(x.dtype)` before its einsum. A `QArray` answers `[...]` with itself and `.astype(dt)`
with the dequantized weight, so the unchanged model code dequantizes inside the expression that feeds the
matmul; memory holds the integers (XLA fuses the convert and scale multiply into the dot's
operand on TPU and GPU; on CPU one layer's weight is materialized at a time inside the layer scan).

int8: symmetric absmax / 127 per output channel, i.e. reduced over the input axes of each weight
(D for q/k/v [D, N, H], gate/up [D, F] and lm_head [D, V]; N, H for o [N, H, D]; F for down [F, D];
D for each embedding row [V, D]). The scale keeps the reduced axes with size 1, so it broadcasts.

int4 (the model card's 4-bit): symmetric absmax / 7 per group of `group_size` (default 128) consecutive
inputs along the last input axis (D, H for o_proj, F for down_proj; the whole axis when the group size
does not divide it), values in [-7, 7], stored as `jnp.int4`: XLA packs it two per byte on TPU, GPU
and CPU (measured on CPU: 0.5 byte per value). Unlike int8, whose convert and scale fuse into the dot
on TPU (no temporaries in an 11B decode step), the grouped int4 dequantization is materialized one layer
at a time inside the layer scan: 0.48 GiB of temporaries per 11B decode step (compile-check), about one
layer's weights in bfloat16. (A first version packed nibbles into int8 bytes by hand; its
shift-and-interleave unpack cost 1.58 GiB per decode step.) The scale has the grouped axis divided by
the group size, the other axes as the weight; dequantizing splits that axis into (groups, group) (a
bitcast, since it is split in place), multiplies and merges back. The axis QArray groups along is kept
as a negative index (static pytree data), so it still names the same axis after the layer scan slices
the leading `layers` axis off.

In int4 mode the embedding and lm_head stay int8 (per row / per output channel), as bitsandbytes' 4-bit
mode (the card's `load_in_4bit`) keeps lm_head in 16 bits: the output layer is the most sensitive to
rounding, and the two tables are 4.6% of the weights (+0.26 GB at 11B).

Both: the scale broadcasts against the weight and indexes along the layer axis like it (the layer scan
slices both). Norm weights stay in their dtype. Scales are float32. Embeddings are quantized too (per row
or per row group; a gather reads the integer row and its scales).

Why not qwix (Google's JAX quantization library, 0.1.8 installed): its PTQ provider intercepts the
einsums of NNX modules and recognizes a weight as an einsum operand that is a module parameter, and
`qwix.quantize_params` quantizes a whole (abstract-model-shaped) parameter tree. Our layers run as
`lax.scan` over split state with weights cast (`.astype`) before the einsum, and loading must quantize
each layer slice as it is read from the file, before the stacked parameter exists. A QArray that the
model reads through its own `[...]` / `.astype` needs neither interception nor a float tree.

Loading: `Generator.from_pretrained(quantize=...)` (and `normistral train` with `lora.base_quantize`)
passes `load_transform(mode)` to `jaxmodel.convert.load_hf_state`, which reads every quantized tensor in
pieces of at most `LOAD_CHUNK_ELEMENTS` values (row ranges of the file, i.e. output channels), quantizes each
piece on the host in NumPy (`quantize_numpy`: bit-identical to `quantize_array` on XLA's CPU backend, and no
XLA compile per tensor shape) and places only the integer arrays and scales on the device or mesh: host memory stays at
about one 16-bit layer slice beyond the process's baseline, the embedding and lm_head (each larger than a
layer) included.

`quantize_model` quantizes a model already in memory (layer by layer), e.g. one restored from Orbax.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from jaxmodel.convert import TensorTransform
from jaxmodel.sharding import auto_mesh, logical_to_spec

MODES = ("int8", "int4")  # normistral.py's QUANTIZE_CHOICES spells the same list (the CLI must not import JAX)
DEFAULT_GROUP_SIZE = 128
_QMAX = {"int8": 127, "int4": 7}
_INT8_IN_INT4_MODE = {("embed_tokens",), ("lm_head",)}  # see the module docstring


def mode_for(path: tuple[str, ...], mode: str) -> str:
    """The mode one parameter is quantized with under `mode` (int4 keeps the embedding and lm_head int8)."""
    return "int8" if mode == "int4" and tuple(path) in _INT8_IN_INT4_MODE else mode


# Parameter path -> input axes (indices into the stored array, layer axis included for `layers/...`).
QUANTIZED: dict[tuple[str, ...], tuple[int, ...]] = {
    ("embed_tokens",): (1,),  # [V, D]: one scale per token row
    ("lm_head",): (0,),  # [D, V]
    ("layers", "self_attn", "q_proj"): (1,),  # [L, D, N, H]
    ("layers", "self_attn", "k_proj"): (1,),
    ("layers", "self_attn", "v_proj"): (1,),
    ("layers", "self_attn", "o_proj"): (1, 2),  # [L, N, H, D]
    ("layers", "mlp", "gate_proj"): (1,),  # [L, D, F]
    ("layers", "mlp", "up_proj"): (1,),
    ("layers", "mlp", "down_proj"): (1,),  # [L, F, D]
}


@jax.tree_util.register_pytree_node_class
class QArray:
    """Integer weight values `q` and their float32 `scale`.

    int8 (`axis` None): q is the weight in int8; scale is q's shape with the input axes set to 1.
    int4 (`axis` a negative axis index): q is the weight in jnp.int4; scale has the weight's shape with
    `axis` divided by the group size."""

    def __init__(self, q, scale, axis: int | None = None):
        self.q, self.scale, self.axis = q, scale, axis

    def tree_flatten(self):
        return (self.q, self.scale), self.axis

    @classmethod
    def tree_unflatten(cls, axis, children):
        return cls(*children, axis=axis)

    def __getitem__(self, key):
        if key is Ellipsis:
            return self
        return QArray(self.q[key], self.scale[key], self.axis)

    @property
    def mode(self) -> str:
        return "int8" if self.axis is None else "int4"

    def astype(self, dtype):
        """The dequantized weight in `dtype` (what the model's einsums consume)."""
        return dequantize(self.q, self.scale, self.axis, dtype)

    def take(self, ids, dtype):
        """Rows of an embedding table [V, D] for ids [...]: gathers integer rows and their scales."""
        return dequantize(jnp.take(self.q, ids, axis=0), jnp.take(self.scale, ids, axis=0), self.axis, dtype)

    @property
    def shape(self):
        return self.q.shape

    @property
    def ndim(self):
        return len(self.q.shape)

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.q) + stored_bytes(self.scale)

    def __repr__(self):
        return f"QArray({self.mode}{list(self.shape)}, scale{list(self.scale.shape)})"


def stored_bytes(x) -> int:
    """Bytes as stored on the device: int4 is packed two per byte (numpy's itemsize says 1)."""
    dtype = jnp.dtype(x.dtype)
    if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
        return (int(np.prod(x.shape)) + 1) // 2
    return int(np.prod(x.shape)) * dtype.itemsize


def dequantize(q, scale, axis: int | None, dtype):
    if axis is None:
        return q.astype(dtype) * scale.astype(dtype)
    a = axis % q.ndim
    n, groups = q.shape[a], scale.shape[a]
    grouped = q.astype(dtype).reshape(q.shape[:a] + (groups, n // groups) + q.shape[a + 1:])
    return (grouped * jnp.expand_dims(scale.astype(dtype), a + 1)).reshape(q.shape)


def group_axis(in_axes) -> int:
    """The axis int4 groups along: the last input axis."""
    return max(in_axes)


def effective_group(size: int, group_size: int) -> int:
    return group_size if size % group_size == 0 else size


def scale_shape(shape, in_axes, mode: str = "int8", group_size: int = DEFAULT_GROUP_SIZE) -> tuple[int, ...]:
    if mode == "int8":
        return tuple(1 if i in in_axes else n for i, n in enumerate(shape))
    a = group_axis(in_axes)
    return tuple(n // effective_group(n, group_size) if i == a else n for i, n in enumerate(shape))


def quantized_shapes(shape, in_axes, mode: str, group_size: int = DEFAULT_GROUP_SIZE):
    """((q shape, q dtype), (scale shape, float32)) of a weight of `shape` quantized per `mode`."""
    q_dtype = jnp.int8 if mode == "int8" else jnp.int4
    return (tuple(shape), q_dtype), (scale_shape(shape, in_axes, mode, group_size), jnp.float32)


def quantize_array(w, in_axes, mode: str = "int8", group_size: int = DEFAULT_GROUP_SIZE) -> QArray:
    """Symmetric quantization of one weight: int8 per output channel (scale = absmax over `in_axes` / 127),
    or int4 per group along the last input axis (absmax over the group / 7); all-zero groups get scale 1."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not one of {MODES}")
    w32 = w.astype(jnp.float32)
    qmax = _QMAX[mode]
    if mode == "int8":
        absmax = jnp.max(jnp.abs(w32), axis=tuple(in_axes), keepdims=True)
        scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
        return QArray(jnp.clip(jnp.round(w32 / scale), -qmax, qmax).astype(jnp.int8), scale)
    a = group_axis(in_axes)
    n = w.shape[a]
    g = effective_group(n, group_size)
    grouped = w32.reshape(w.shape[:a] + (n // g, g) + w.shape[a + 1:])
    absmax = jnp.max(jnp.abs(grouped), axis=a + 1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
    values = jnp.clip(jnp.round(grouped / scale), -qmax, qmax).astype(jnp.int4).reshape(w.shape)
    axis = a - w.ndim  # negative: the same axis after the layer axis is sliced off
    return QArray(values, jnp.squeeze(scale, a + 1), axis)


def _path(p) -> tuple[str, ...]:
    return tuple(str(x) for x in p)


def _placement(var, mesh, shape):
    """Where a (possibly quantized) part of a parameter goes: the mesh's rule for the parameter's logical
    axes applied to the part's shape (dimensions the mesh does not divide are replicated), or the
    default device when mesh is None."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    axes = tuple(var.get_metadata()["out_sharding"])
    mesh = auto_mesh(mesh)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


@functools.cache
def _quantize_jit(in_axes, mode, group_size):
    fn = functools.partial(quantize_array, in_axes=in_axes, mode=mode, group_size=group_size)
    return jax.jit(lambda w: fn(w))


def quantize_numpy(w: np.ndarray, in_axes, mode: str = "int8", group_size: int = DEFAULT_GROUP_SIZE):
    """`quantize_array` on the host in NumPy: (q, scale) as NumPy arrays (q in int8, or ml_dtypes.int4),
    bit-identical to the XLA version: the same float32 operations in the order XLA's CPU compile runs
    them (absmax, scale = absmax * (1/qmax), w * (1/scale), round half to even, clip; checked against it
    in tests/inference/test_quantize.py). What loading uses: no XLA compile
    per tensor shape, and one float32 copy of `w` as the only large temporary (every step runs in place;
    absmax is max(max, -min), which needs no |w| copy)."""
    qmax = np.float32(_QMAX[mode])
    w32 = np.array(w, dtype=np.float32, order="C")  # a fresh contiguous copy, modified in place below
    if mode == "int8":
        axes, grouped, a = tuple(in_axes), w32, None
    else:
        a = group_axis(in_axes)
        n = w.shape[a]
        g = effective_group(n, group_size)
        grouped = w32.reshape(w.shape[:a] + (n // g, g) + w.shape[a + 1:])  # a view: w32 is contiguous
        axes = (a + 1,)
    absmax = np.maximum(grouped.max(axis=axes, keepdims=True), -grouped.min(axis=axes, keepdims=True))
    # XLA rewrites the division by the constant qmax as a multiplication by its float32 reciprocal: so do we.
    scale = np.where(absmax > 0, absmax * (np.float32(1.0) / qmax), np.float32(1.0)).astype(np.float32)
    # And w / scale (scale broadcast) as w * (1 / scale), the reciprocal once per scale: so do we.
    np.multiply(grouped, np.float32(1.0) / scale, out=grouped)
    np.rint(grouped, out=grouped)
    np.clip(grouped, -qmax, qmax, out=grouped)
    if mode == "int8":
        return w32.astype(np.int8), scale
    return w32.astype(ml_dtypes.int4), np.squeeze(scale, a + 1)


# Pieces of at most this many values per source tensor while loading (16 MiB of float32 temporaries).
LOAD_CHUNK_ELEMENTS = 1 << 22


def _host_quantizer(in_axes, mode, group_size):
    """numpy weight (or a piece of one along an output axis) -> {"q", "scale"} numpy arrays, on the host
    (the accelerator never sees the 16-bit weight)."""

    def run(w: np.ndarray):
        q, scale = quantize_numpy(w, in_axes, mode, group_size)
        return {"q": q, "scale": scale}

    return run


def load_transform(mode: str, group_size: int = DEFAULT_GROUP_SIZE, chunk_elements: int = LOAD_CHUNK_ELEMENTS):
    """The per-tensor transform `jaxmodel.convert.load_hf_state(transform=...)` applies while reading:
    each parameter in QUANTIZED becomes a QArray, quantized piece by piece (at most `chunk_elements` values,
    along an output axis) as its tensors are read."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not one of {MODES}")

    def transform(path, var):
        in_axes = QUANTIZED.get(path)
        if in_axes is None:
            return None
        m = mode_for(path, mode)
        (q_shape, q_dtype), (s_shape, s_dtype) = quantized_shapes(var.shape, in_axes, m, group_size)
        stacked = path[0] == "layers"
        slice_axes = tuple(a - 1 for a in in_axes) if stacked else in_axes
        axis = group_axis(in_axes) - len(var.shape) if m == "int4" else None
        return TensorTransform(parts={"q": (q_shape, q_dtype), "scale": (s_shape, s_dtype)},
                               convert=_host_quantizer(slice_axes, m, group_size),
                               combine=lambda parts: QArray(parts["q"], parts["scale"], axis),
                               chunk_elements=chunk_elements)

    return transform


def quantize_model(model: nnx.Module, mode: str = "int8", *, mesh=None, place: bool = False,
                   group_size: int = DEFAULT_GROUP_SIZE) -> nnx.Module:
    """Replaces the large matrices of `model` by `QArray`s (in place; also returned).

    Without `place`, each quantized array stays where its parameter was (same sharding rules applied to
    the parts' shapes). With `place`, every parameter (quantized or not) is moved to `mesh` by the rules,
    or to the default device when mesh is None: the path that quantizes on the host and ships only the
    integers to the accelerator."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not one of {MODES}")
    _, state = nnx.split(model)
    for p, var in nnx.to_flat_state(state):
        p = _path(p)
        w = var.get_value()
        if isinstance(w, QArray):
            continue
        in_axes = QUANTIZED.get(p)
        if in_axes is None:
            if place:
                var.set_value(jax.device_put(w, _placement(var, mesh, var.shape)))
            continue
        m = mode_for(p, mode)
        if p[0] == "layers":
            # One layer at a time: the float32 temporary is a single layer's matrix.
            fn = _quantize_jit(tuple(a - 1 for a in in_axes), m, group_size)
            parts = [fn(w[i]) for i in range(w.shape[0])]
            stack = np.stack if place else jnp.stack
            conv = np.asarray if place else (lambda x: x)
            q, s = stack([conv(x.q) for x in parts]), stack([conv(x.scale) for x in parts])
            axis = parts[0].axis
            del parts
        else:
            qa = _quantize_jit(tuple(in_axes), m, group_size)(w)
            q, s, axis = qa.q, qa.scale, qa.axis
        if place:
            q_sh, s_sh = _placement(var, mesh, q.shape), _placement(var, mesh, s.shape)
        elif isinstance(w.sharding, NamedSharding):  # stay on the parameter's mesh
            q_sh, s_sh = _placement(var, w.sharding.mesh, q.shape), _placement(var, w.sharding.mesh, s.shape)
        else:
            q_sh = s_sh = w.sharding
        del w
        var.set_value(QArray(jax.device_put(q, q_sh), jax.device_put(s, s_sh), axis))
    return model


def abstract_quantized_state(state: nnx.State, mesh, mode: str = "int8",
                             group_size: int = DEFAULT_GROUP_SIZE) -> nnx.State:
    """An abstract state (ShapeDtypeStructs with shardings, as `jaxmodel.aot.abstract_state` returns)
    with the quantized parameters replaced by abstract QArrays: for ahead-of-time memory checks."""
    mesh = auto_mesh(mesh)
    flat = nnx.to_flat_state(state)
    for p, var in flat:
        in_axes = QUANTIZED.get(_path(p))
        if in_axes is None:
            continue
        m = mode_for(_path(p), mode)
        (q_shape, q_dtype), (s_shape, s_dtype) = quantized_shapes(var.shape, in_axes, m, group_size)
        axis = group_axis(in_axes) - len(var.shape) if m == "int4" else None
        var.set_value(QArray(
            jax.ShapeDtypeStruct(q_shape, q_dtype, sharding=_placement(var, mesh, q_shape)),
            jax.ShapeDtypeStruct(s_shape, s_dtype, sharding=_placement(var, mesh, s_shape)), axis))
    return nnx.from_flat_state(flat)


def param_bytes(model_or_state) -> int:
    """Bytes of all parameters (integer values and scales counted for quantized ones)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.split(model_or_state)[1]
    return sum(stored_bytes(x) for x in jax.tree.leaves(state))
