"""Weight-only int8 quantization: int8 matrices with per-output-channel scales, dequantized in the matmul.

Inside: `QArray` (int8 values + float32 scales, a pytree), `QUANTIZED` (which parameters, and which of
their axes are inputs), `quantize_array`, `quantize_model(model, mesh=None)`, `abstract_quantized_state`,
`param_bytes`.

How it plugs into the model without changing it: the model reads every weight as
`self.w[...].astype(x.dtype)` before its einsum. A `QArray` answers `[...]` with itself and `.astype(dt)`
with `q.astype(dt) * scale.astype(dt)`, so the unchanged model code dequantizes inside the expression
that feeds the matmul; memory holds int8 (XLA fuses the convert and the scale multiply into the dot's
operand on TPU and GPU; on CPU one layer's weight is materialized at a time inside the layer scan).

Scales: symmetric absmax / 127 per output channel, i.e. reduced over the input axes of each weight
(D for q/k/v [D, N, H], gate/up [D, F] and lm_head [D, V]; N, H for o [N, H, D]; F for down [F, D];
D for each embedding row [V, D]). The scale keeps the reduced axes with size 1, so it broadcasts against
the weight and indexes along the layer axis like it (the layer scan slices both). Norm weights stay in
their dtype. Scales are float32: 4 bytes per output channel, negligible beside the int8 matrices.
Embeddings are quantized too (per row; a gather reads the int8 row and its scale).

Quantizing a loaded model goes parameter by parameter and, for the stacked [L, ...] ones, layer by layer,
so the transient float32 copy is one layer's matrix. `Generator.from_pretrained(quantize="int8")` loads
the bfloat16 weights into host memory (the CPU backend), quantizes there and places only int8 arrays on
the accelerator, so the device never holds the 16-bit model (host RAM needs ~2 bytes per parameter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from jaxmodel.sharding import auto_mesh, logical_to_spec

MODES = ("int8",)

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
    """An int8 weight `q` and its float32 `scale` (q's shape with the input axes set to 1)."""

    def __init__(self, q, scale):
        self.q, self.scale = q, scale

    def tree_flatten(self):
        return (self.q, self.scale), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    def __getitem__(self, key):
        if key is Ellipsis:
            return self
        return QArray(self.q[key], self.scale[key])

    def astype(self, dtype):
        """The dequantized weight in `dtype` (what the model's einsums consume)."""
        return self.q.astype(dtype) * self.scale.astype(dtype)

    def take(self, ids, dtype):
        """Rows of an embedding table [V, D] for ids [...]: gathers int8 rows and their scales."""
        return jnp.take(self.q, ids, axis=0).astype(dtype) * jnp.take(self.scale, ids, axis=0).astype(dtype)

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
        return _nbytes(self.q) + _nbytes(self.scale)

    def __repr__(self):
        return f"QArray(int8{list(self.q.shape)}, scale{list(self.scale.shape)})"


def _nbytes(x) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def scale_shape(shape, in_axes) -> tuple[int, ...]:
    return tuple(1 if i in in_axes else n for i, n in enumerate(shape))


def quantize_array(w, in_axes) -> QArray:
    """Symmetric per-output-channel int8: scale = absmax over `in_axes` / 127 (1 for all-zero channels)."""
    w32 = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=tuple(in_axes), keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return QArray(jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8), scale)


def _path(p) -> tuple[str, ...]:
    return tuple(str(x) for x in p)


def _placement(var, mesh, scale: bool, in_axes):
    """Where a (possibly quantized) parameter goes: the mesh's rule, or the default device."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    axes = tuple(var.get_metadata()["out_sharding"])
    shape = scale_shape(var.shape, in_axes) if scale else var.shape
    mesh = auto_mesh(mesh)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


_quantize_jit = jax.jit(quantize_array, static_argnums=1)


def quantize_model(model: nnx.Module, mode: str = "int8", *, mesh=None, place: bool = False) -> nnx.Module:
    """Replaces the large matrices of `model` by `QArray`s (in place; also returned).

    Without `place`, each quantized array stays where its parameter was (same sharding, scales
    replicated along their size-1 axes). With `place`, every parameter (quantized or not) is moved to
    `mesh` by the rules, or to the default device when mesh is None: the path that quantizes on the
    host and ships only int8 to the accelerator."""
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
                var.set_value(jax.device_put(w, _placement(var, mesh, False, ())))
            continue
        if p[0] == "layers":
            # One layer at a time: the float32 temporary is a single layer's matrix.
            layer_axes = tuple(a - 1 for a in in_axes)
            parts = [_quantize_jit(w[i], layer_axes) for i in range(w.shape[0])]
            q = np.stack([np.asarray(x.q) for x in parts]) if place else jnp.stack([x.q for x in parts])
            s = np.stack([np.asarray(x.scale) for x in parts]) if place else jnp.stack([x.scale for x in parts])
            del parts
        else:
            qa = _quantize_jit(w, in_axes)
            q, s = qa.q, qa.scale
        if place:
            q_sh, s_sh = _placement(var, mesh, False, in_axes), _placement(var, mesh, True, in_axes)
        else:
            q_sh = w.sharding
            s_sh = (NamedSharding(w.sharding.mesh, logical_to_spec(
                tuple(var.get_metadata()["out_sharding"]), scale_shape(w.shape, in_axes), w.sharding.mesh))
                if isinstance(w.sharding, NamedSharding) else w.sharding)
        del w
        var.set_value(QArray(jax.device_put(q, q_sh), jax.device_put(s, s_sh)))
    return model


def abstract_quantized_state(state: nnx.State, mesh) -> nnx.State:
    """An abstract state (ShapeDtypeStructs with shardings, as `jaxmodel.aot.abstract_state` returns)
    with the quantized parameters replaced by abstract QArrays: for ahead-of-time memory checks."""
    mesh = auto_mesh(mesh)
    flat = nnx.to_flat_state(state)
    for p, var in flat:
        in_axes = QUANTIZED.get(_path(p))
        if in_axes is None:
            continue
        axes = tuple(var.get_metadata()["out_sharding"])
        s_shape = scale_shape(var.shape, in_axes)
        var.set_value(QArray(
            jax.ShapeDtypeStruct(var.shape, jnp.int8, sharding=NamedSharding(
                mesh, logical_to_spec(axes, var.shape, mesh))),
            jax.ShapeDtypeStruct(s_shape, jnp.float32, sharding=NamedSharding(
                mesh, logical_to_spec(axes, s_shape, mesh)))))
    return nnx.from_flat_state(flat)


def param_bytes(model_or_state) -> int:
    """Bytes of all parameters (int8 values and scales counted for quantized ones)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.split(model_or_state)[1]
    return sum(_nbytes(x) for x in jax.tree.leaves(state))
