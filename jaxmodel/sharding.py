"""Device meshes and the one table that maps logical axis names to mesh axes.

Inside:
- `MESH_AXES` = ("data", "fsdp", "tensor"); `MeshShape` (sizes, one may be -1 = the rest) and
  `make_mesh(shape)`.
- `RULES`: logical axis -> mesh axis (or axes). `logical_to_spec` applies it to one array and refuses
  a spec that would put two logical axes on one mesh axis.
- `param_sharding(var, mesh)`, `model_shardings(model, mesh)`, `shard_model(model, mesh)`.
- `constrain(x, logical_axes)`: an activation sharding constraint, a no-op outside a mesh context.

Design choices:
- Meshes are used with `AxisType.Auto` axes: the model is written once, with shardings on parameters and
  a few activation constraints at layer boundaries, and XLA's partitioner places the rest. `jax.make_mesh`
  makes Explicit axes by default in this JAX, whose sharding-in-types would ask every einsum for an
  output sharding; `auto_mesh` converts (same devices, same names).
- A dimension whose size the mesh axis does not divide is replicated instead of failing. That is how
  GQA with `tensor` larger than the KV heads works (NorMistral has 8 KV heads; with tensor=16 the K/V
  projections are replicated over `tensor` while the 32 query heads are split), and how a batch of 1
  runs on a data-parallel mesh. The replication is deliberate and reported by `describe`.
- `layers` is never sharded: the scan slices one layer at a time, and sharding that axis would make
  every step gather a whole layer onto each device.
- FSDP shards `embed` (the model dimension every weight has), so each weight is split over `fsdp`;
  tensor parallelism splits heads, MLP width and vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (a tuple means the dimension is split over several mesh axes, in order).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # Parameters.
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    # Activations.
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # KV cache.
    "cache_batch": ("data", "fsdp"),
    "cache_length": None,
}


class ShardingError(ValueError):
    """A mesh or rule that cannot be applied (the message names the culprit)."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ShardingError(f"mesh {sizes}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ShardingError(f"mesh {sizes}: sizes must be positive (or -1 for the rest)")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ShardingError(f"mesh {sizes}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ShardingError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, {num_devices} available"
            )
        return tuple(sizes)


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same mesh with Auto axes (see the module docstring)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def make_mesh(shape: MeshShape | Sequence[int] | dict, devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    if isinstance(shape, dict):
        shape = MeshShape(**shape)
    elif not isinstance(shape, MeshShape):
        shape = MeshShape(*shape)
    sizes = shape.resolve(len(devices))
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict | None = None
) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes and shape on `mesh`."""
    rules = RULES if rules is None else rules
    used: dict[str, str] = {}
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no sharding rule")
        target = rules[name]
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1)
        for t in targets:
            if t in used:
                raise ShardingError(
                    f"logical axes {used[t]!r} and {name!r} both map to mesh axis {t!r} in {tuple(axes)}"
                )
            used[t] = name
        # Keep the longest prefix of mesh axes whose product divides the dimension; replicate the rest.
        while targets and size % math.prod(mesh.shape[t] for t in targets):
            targets = targets[:-1]
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def _axes_of(var) -> tuple:
    axes = var.get_metadata().get("out_sharding")
    if axes is None:
        raise ShardingError(f"parameter of shape {var.shape} has no logical axis names")
    return tuple(axes)


def param_sharding(var, mesh: Mesh, rules: dict | None = None) -> NamedSharding:
    mesh = auto_mesh(mesh)
    return NamedSharding(mesh, logical_to_spec(_axes_of(var), var.shape, mesh, rules))


def model_shardings(model: nnx.Module, mesh: Mesh, rules: dict | None = None) -> nnx.State:
    """A State of NamedShardings with the structure of the model's state."""
    _, state = nnx.split(model)
    return jax.tree.map(lambda v: param_sharding(v, mesh, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: dict | None = None) -> nnx.Module:
    """Moves an in-memory model onto the mesh (each parameter to its NamedSharding)."""
    graphdef, state = nnx.split(model)
    shardings = model_shardings(model, mesh, rules)
    state = jax.tree.map(
        lambda v, s: v.replace(jax.device_put(v.get_value(), s)),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, state)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, from logical names; a no-op without a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(t == AxisType.Auto for t in mesh.axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def describe(model: nnx.Module, mesh: Mesh) -> list[tuple[str, tuple, PartitionSpec]]:
    """(path, logical axes, spec) for each parameter: what the rules decided, for logs and docs."""
    _, state = nnx.split(model)
    out = []
    for path, var in nnx.to_flat_state(state):
        axes = _axes_of(var)
        out.append(("/".join(map(str, path)), axes, logical_to_spec(axes, var.shape, auto_mesh(mesh))))
    return out
