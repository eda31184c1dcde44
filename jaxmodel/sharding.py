"""Device meshes and the one table that maps logical axis names to mesh axes.

Inside:
- `MESH_AXES` = ("data", "fsdp", "context", "tensor"); `MeshShape` (sizes, one may be -1 = the rest;
  `context` defaults to 1) and `make_mesh(shape)` (which leaves `context` out when it is 1).
- `RULES`: logical axis -> mesh axis (or axes). `logical_to_spec` applies it to one array and refuses
  a spec that would put two logical axes on one mesh axis.
- `param_sharding(var, mesh)`, `model_shardings(model, mesh)`, `shard_model(model, mesh)`.
- `constrain(x, logical_axes)`: an activation sharding constraint, a no-op outside a mesh context.
- `under_auto_axes(method)`: lets the model's entry points run under a user's `jax.set_mesh(jax.make_mesh(...))`
  (Explicit axes) as well as under Auto ones.
- `REPLICATED_BY_DESIGN` (the deliberate replications, each with why) and `check_divisible(model, mesh,
  batches=...)`: the validation every run does before compiling (below); `model` is the caller's
  (`model.abstract_model(config)` is enough: shapes only), so this module imports no model and stays at
  the bottom of the import graph, under model.py and attention.py.
- `platform()`: the platform a program is compiled for (the mesh's when one is set).

Design choices:
- Meshes are used with `AxisType.Auto` axes: the model is written once, with shardings on parameters and
  a few activation constraints at layer boundaries, and XLA's partitioner places the rest. `jax.make_mesh`
  makes Explicit axes by default in this JAX, whose sharding-in-types would ask every einsum for an
  output sharding; `auto_mesh` converts (same devices, same names). A user need not know: the model's
  entry points (`under_auto_axes`) run under the Auto twin of an Explicit context mesh, converting
  explicitly sharded arguments (what `jax.sharding.auto_axes` does), so
  `with jax.set_mesh(jax.make_mesh(shape, MESH_AXES)): model(ids)` just works.
- `logical_to_spec` replicates a dimension whose size the mesh axis does not divide instead of failing
  (how a batch of 1 decodes on a data-parallel mesh). Runs do not rely on that silently: before
  compiling, `train` and `compile-check` call `check_divisible`, which refuses every parameter or
  activation dimension a mesh axis does not divide, and every batch `data x fsdp` does not divide,
  except the replications listed in `REPLICATED_BY_DESIGN` (GQA with `tensor` larger than the KV heads:
  NorMistral has 8 KV heads; with tensor=16 the K/V projections are replicated over `tensor` while the
  32 query heads are split). `describe` reports what the rules decided.
- `layers` is never sharded: the scan slices one layer at a time, and sharding that axis would make
  every step gather a whole layer onto each device.
- FSDP shards `embed` (the model dimension every weight has), so each weight is split over `fsdp`;
  tensor parallelism splits heads, MLP width and vocabulary.
- `context` splits the activations' `length` (context parallelism, jaxmodel/context_parallel.py); no
  weight is ever split over it: weights are replicated over `context` and split over `fsdp` only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")  # tensor innermost: the fastest links

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
    "lora_rank": None,  # LoRA adapters (jaxmodel/lora.py): a few columns, never split
    # Activations.
    "batch": ("data", "fsdp"),
    "length": "context",  # context parallelism: each context shard holds two chunks of every sequence
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # KV cache pages (jaxmodel/kv_cache.py): one pool every sequence draws from, so pages stay whole on each
    # device (a sequence's pages are anywhere in the pool); the combined key/value heads go like kv heads.
    "cache_pages": None,
    "page": None,
}


class ShardingError(ValueError):
    """A mesh or rule that cannot be applied (the message names the culprit)."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Mesh sizes. Positional order stays (data, fsdp, tensor) as before `context` existed, so a 3-tuple
    means what it always did; `resolve` returns them in `MESH_AXES` order."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int, int]:
        sizes = [self.data, self.fsdp, self.context, self.tensor]
        named = dict(zip(MESH_AXES, sizes))
        if sizes.count(-1) > 1:
            raise ShardingError(f"mesh {named}: at most one axis may be -1")
        if any(not isinstance(s, int) or s == 0 or s < -1 for s in sizes):
            raise ShardingError(f"mesh {named}: sizes must be positive integers (or -1 for the rest)")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ShardingError(f"mesh {named}: {num_devices} devices are not divisible by {known}")
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
    """A ("data", "fsdp", "context", "tensor") mesh over `devices` (default: all devices), without the
    `context` axis when its size is 1. A sequence of sizes is (data, fsdp, tensor) or (data, fsdp, tensor,
    context), as `MeshShape`'s fields."""
    devices = list(devices if devices is not None else jax.devices())
    if isinstance(shape, dict):
        shape = MeshShape(**shape)
    elif not isinstance(shape, MeshShape):
        shape = MeshShape(*shape)
    sizes = shape.resolve(len(devices))
    # Without context parallelism the mesh has no `context` axis: a size-1 axis would split nothing and only
    # change every mesh a report or log prints (the rules skip axes a mesh lacks).
    axes = [(name, size) for name, size in zip(MESH_AXES, sizes) if name != "context" or size > 1]
    sizes, names, types = tuple(n for _, n in axes), tuple(a for a, _ in axes), (AxisType.Auto,) * len(axes)
    if shape.context > 1:
        grid = _host_local_context(sizes, devices)
        if grid is not None:
            return Mesh(grid, names, axis_types=types)
    try:
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
        return jax.make_mesh(sizes, names, axis_types=types, devices=devices)
    except NotImplementedError:
        if shape.context == 1:
            raise
    # A context axis often leaves sizes that are no product of whole physical axes (fsdp 128 x context 2 on
    # a 4x8x8 v5p slice): let the topology's axes be split, as jax.make_mesh does not.
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, names, axis_types=types)


def _host_local_context(sizes, devices):
    """A device grid for (data, fsdp, context, tensor) `sizes` spanning several processes (hosts) in which
    every context x tensor group lies within one host (its all-gathers then stay on the host's fast links;
    a host reads only what its devices hold either way): each host holds (1, fsdp/hosts', context, tensor)
    and the hosts line up along data and fsdp. None for one process, or when the sizes do not allow it (the
    plain layout is taken: context groups then span hosts)."""
    from jax.experimental import mesh_utils

    hosts = len({d.process_index for d in devices})
    data, fsdp, context, tensor = sizes
    local = len(devices) // hosts
    if hosts == 1 or local % (context * tensor) or fsdp % (local // (context * tensor)):
        return None
    per_host_fsdp = local // (context * tensor)
    return mesh_utils.create_hybrid_device_mesh((1, per_host_fsdp, context, tensor),
                                                (data, fsdp // per_host_fsdp, 1, 1), devices,
                                                process_is_granule=True, allow_split_physical_axes=True)


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


def platform() -> str:
    """The platform the program is compiled for: the mesh's when one is set (an ahead-of-time TPU compile
    on a CPU machine must get the real kernel, not the interpreter), else the default device's."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.devices()[0].platform if mesh.empty else mesh.abstract_device.platform


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


def _auto_typed(x):
    """An array argument whose type carries Explicit mesh axes, resharded into the Auto context (the
    partitioner then places it, as `jax.sharding.auto_axes` does with its arguments)."""
    if isinstance(x, (jax.Array, jax.core.Tracer)):
        mesh = jax.typeof(x).sharding.mesh
        if not mesh.empty and AxisType.Explicit in mesh.axis_types:
            return jax.sharding.reshard(x, PartitionSpec(*([None] * x.ndim)))
    return x


def under_auto_axes(method):
    """Decorates a model entry point `method(self, *arrays, **options)`: under a context mesh with Explicit
    axes it runs under the same mesh with those axes Auto (see the module docstring); else unchanged."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or AxisType.Explicit not in mesh.axis_types:
            return method(self, *args, **kwargs)
        auto = mesh.update_axis_types({a: AxisType.Auto for a, t in zip(mesh.axis_names, mesh.axis_types)
                                       if t == AxisType.Explicit})
        with jax.sharding.use_abstract_mesh(auto):
            args, kwargs = jax.tree.map(_auto_typed, (args, kwargs))
            return method(self, *args, **kwargs)

    return wrapper


def describe(model: nnx.Module, mesh: Mesh) -> list[tuple[str, tuple, PartitionSpec]]:
    """(path, logical axes, spec) for each parameter: what the rules decided, for logs and docs."""
    _, state = nnx.split(model)
    out = []
    for path, var in nnx.to_flat_state(state):
        axes = _axes_of(var)
        out.append(("/".join(map(str, path)), axes, logical_to_spec(axes, var.shape, auto_mesh(mesh))))
    return out


# -- validation before compiling ------------------------------------------------------------------------------

# Logical axes that may stay whole on a mesh axis larger than them, and why (anything else must divide).
REPLICATED_BY_DESIGN: dict[str, str] = {
    "kv_heads": "GQA: with tensor > KV heads each tensor shard's query heads need their group's whole K/V "
                "heads, so the K/V projections (a small part of the weights) are replicated over tensor",
    "act_kv_heads": "the K/V activations of those replicated projections (see kv_heads)",
}


def _mesh_axes_of(name: str, mesh: Mesh, rules: dict) -> tuple[str, ...]:
    target = rules.get(name)
    targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return tuple(t for t in targets if t in mesh.shape and mesh.shape[t] > 1)


def _undivided(name: str, size: int, mesh: Mesh, rules: dict) -> tuple[str, int] | None:
    """(mesh axes as text, their product) when they do not divide `size` and that is not by design."""
    targets = _mesh_axes_of(name, mesh, rules)
    n = math.prod(mesh.shape[t] for t in targets)
    if not targets or size % n == 0:
        return None
    if name in REPLICATED_BY_DESIGN and n > size and n % size == 0:
        return None
    return " x ".join(f"{t}={mesh.shape[t]}" for t in targets), n


def _mesh_text(mesh: Mesh) -> str:
    return "mesh {" + ", ".join(f"{k}: {v}" for k, v in mesh.shape.items()) + "}"


def check_divisible(model: nnx.Module, mesh: Mesh, *, batches: Sequence[tuple[str, int]] = (),
                    rules: dict | None = None):
    """Refuses (ShardingError, one line naming the numbers and the fix) any dimension of `model`'s
    parameters or activations (its `config`'s heads, MLP width, vocabulary), or any of `batches` ((what,
    size) pairs such as ("train.global_batch_size", 64)), that its mesh axes do not divide, except
    `REPLICATED_BY_DESIGN`. Shapes only: pass `model.abstract_model(config)`, nothing is allocated, so it
    runs before any compile."""
    rules = RULES if rules is None else rules
    for what, size in batches:
        bad = _undivided("batch", size, mesh, rules)
        if bad:
            axes, n = bad
            raise ShardingError(
                f"{what}={size} is not divisible by {axes} = {n} ({_mesh_text(mesh)}): the batch would be "
                f"replicated, every device computing all of it; use a multiple of {n} or change the mesh")
    config = model.config
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        for axis, (name, size) in enumerate(zip(_axes_of(var), var.shape)):
            bad = name and _undivided(name, size, mesh, rules)
            if bad:
                axes, n = bad
                where = "/".join(map(str, path))
                raise ShardingError(
                    f"{where}: dimension {axis} ({name}, {size}) is not divisible by {axes} "
                    f"({_mesh_text(mesh)}): it would be replicated on every device; choose a {axes.split('=')[0]} "
                    f"size that divides {size}")
    heads = {"act_heads": config.num_attention_heads, "act_kv_heads": config.num_key_value_heads,
             "act_mlp": config.intermediate_size, "act_vocab": config.vocab_size}
    for name, size in heads.items():
        bad = _undivided(name, size, mesh, rules)
        if bad:
            axes, n = bad
            raise ShardingError(f"activations: {name} ({size}) is not divisible by {axes} ({_mesh_text(mesh)}); "
                                f"choose a {axes.split('=')[0]} size that divides {size}")
