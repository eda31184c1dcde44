"""Ahead-of-time compilation for TPU topologies from a CPU-only machine, and the memory verdict.

Inside:
- `check_topology(topology)`: the syntax check (generation and 2-D / 3-D sizes), before any work;
  `check_attention(tree, topology)`: the model's attention kernel is one a TPU runs (not cuDNN).
- `tpu_devices(topology)`: the devices of a TPU slice such as "v5p:4x4x4", "v5e:2x2", "v6e:1x1",
  described by libtpu (`jax.experimental.topologies`) without any TPU attached.
- `HBM_BYTES`: memory per chip by device kind (the compiler does not report capacity).
- `abstract_state(model, mesh)`: the model's parameters as sharded ShapeDtypeStructs (no memory).
- `memory_report(compiled, hbm)`: per-device argument, output, alias and temporary bytes, and `fits`.

The process must run JAX on the CPU backend (`JAX_PLATFORMS=cpu`, set by the CLI before JAX loads) and
may share libtpu with another process (`ALLOW_MULTIPLE_LIBTPU_LOAD=1`): it only compiles.

How: libtpu compiles for a topology description as it would on the pod; `jit(...).lower(...).compile()`
then gives the real TPU executable, whose `memory_analysis()` is the compiler's own account of the
per-device memory. `device_bytes` = arguments + temporaries + outputs - aliased (donated) bytes, the peak
the executable needs while it runs. It excludes the runtime's own reserve, so `fits` also demands a
margin (`HEADROOM`, 5% of HBM). A program too large to compile at all (libtpu's RESOURCE_EXHAUSTED) is
reported by `compile_and_report` with `fits: false` and the compiler's own figures, not raised.
"""

from __future__ import annotations

import math
import re

import jax
from flax import nnx

from jaxmodel.sharding import param_sharding

GiB = 1024**3
# Per-chip HBM by `device_kind` (public Cloud TPU specifications).
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5": 95 * GiB,  # v5p
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
}
HEADROOM = 0.05


class TopologyError(ValueError):
    """A topology libtpu does not know, or libtpu is missing."""


# Chip generations `--topology` accepts and the number of dimensions of their slices (v5e and v6e slices
# are 2-D tori; v4 and v5p are 3-D).
TOPOLOGY_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}


def check_topology(topology: str) -> tuple[str, list[int]]:
    """(generation, sizes) of a topology such as 'v5p:4x4x4' or 'v5e:2x2', or a TopologyError naming it.
    Cheap (no libtpu), so the CLI runs it before anything else."""
    kind, sep, dims = topology.partition(":")
    examples = ", ".join(f"{k}:{'x'.join(['2'] * n)}" for k, n in TOPOLOGY_DIMS.items())
    if not sep or kind not in TOPOLOGY_DIMS:
        raise TopologyError(f"--topology {topology!r}: expected GENERATION:AxB[xC] with a generation of "
                            f"{', '.join(TOPOLOGY_DIMS)} (e.g. {examples})")
    try:
        sizes = [int(x) for x in dims.split("x")]
    except ValueError:
        sizes = []
    if len(sizes) != TOPOLOGY_DIMS[kind] or any(n < 1 for n in sizes):
        shape = "x".join("ABC"[:TOPOLOGY_DIMS[kind]])
        raise TopologyError(f"--topology {topology!r}: {kind} slices are {TOPOLOGY_DIMS[kind]}-D, expected "
                            f"{kind}:{shape} with positive sizes (e.g. {kind}:{'x'.join(['2'] * TOPOLOGY_DIMS[kind])})")
    return kind, sizes


def check_attention(tree: dict, topology: str) -> None:
    """The model's attention kernel runs on TPUs: cuDNN's is NVIDIA's, so a TPU compile of it is refused
    here, in one line, before libtpu is loaded (it would fail inside the trace)."""
    from jaxmodel.run_config import where

    # An implementation option: only the model section sets it (config.json files never do).
    if (tree.get("model") or {}).get("attention_impl") == "cudnn":
        raise TopologyError(f"{where(tree, 'model.attention_impl')}: model.attention_impl=cudnn is "
                            f"NVIDIA's kernel and --topology {topology} is a TPU slice; use splash (the Pallas "
                            "TPU kernel), flash, xla or auto")


def tpu_devices(topology: str) -> list:
    """Devices of a TPU topology like 'v5p:4x4x4'. Slices smaller than one host (2x2) are described
    with a matching host size (libtpu's default host is 2x2x1)."""
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError("libtpu is not installed: pip install -e '.[tpu]'") from None
    _, sizes = check_topology(topology)
    kwargs = {}
    if math.prod(sizes) < 4:
        kwargs["chips_per_host_bounds"] = tuple(sizes + [1] * (3 - len(sizes)))
    try:
        return list(topologies.get_topology_desc(topology, platform="tpu", **kwargs).devices)
    except Exception as e:  # libtpu raises XlaRuntimeError with a multi-line message
        raise TopologyError(f"topology {topology!r}: {str(e).splitlines()[0]}") from None


def hbm_bytes(device) -> int:
    kind = device.device_kind
    if kind not in HBM_BYTES:
        raise TopologyError(f"no HBM size known for device kind {kind!r}")
    return HBM_BYTES[kind]


def abstract_state(model: nnx.Module, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) where every parameter is a ShapeDtypeStruct carrying its NamedSharding."""
    graphdef, state = nnx.split(model)

    def to_sds(var):
        value = var.get_value()
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=param_sharding(var, mesh)))

    return graphdef, jax.tree.map(to_sds, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def memory_report(compiled, hbm: int) -> dict:
    m = compiled.memory_analysis()
    device_bytes = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "device_bytes": int(device_bytes),
        "hbm_bytes": int(hbm),
        "fits": bool(device_bytes <= (1 - HEADROOM) * hbm),
    }


def _argument_bytes(args) -> int:
    """Per-device bytes of sharded abstract arguments (the most any one device holds)."""
    total = 0
    for leaf in jax.tree.leaves(args):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * getattr(leaf.dtype, "itemsize", 0)  # a PRNG key's dtype: a few bytes, ignored
    return total


def exhausted_report(error: Exception, args, hbm: int) -> dict | None:
    """The memory report of a program libtpu refused to compile because it cannot fit (RESOURCE_EXHAUSTED,
    stating the temporaries it would need): that figure plus the argument bytes, `fits: false`. None for
    any other error (a bug: the caller re-raises it)."""
    message = str(error)
    found = re.search(r"HLO temporaries \(([0-9.]+)([KMGT])\)", message)
    if "RESOURCE_EXHAUSTED" not in message or not found:
        return None
    temp = int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)
    arguments = _argument_bytes(args)
    return {"argument_bytes": arguments, "output_bytes": None, "alias_bytes": None, "temp_bytes": temp,
            "device_bytes": arguments + temp, "hbm_bytes": int(hbm), "fits": False,
            "compiler": message.strip().splitlines()[0][:300]}


def compile_and_report(jitted, args, hbm: int, static=()) -> dict:
    """Compiles `jitted` for `static` (its leading static arguments) and `args` (sharded
    ShapeDtypeStructs) and returns the memory report; a program that cannot fit is reported by
    `exhausted_report` (libtpu refuses to compile it)."""
    try:
        compiled = jitted.lower(*static, *args).compile()
    except Exception as e:  # JaxRuntimeError; its class moved between JAX versions
        report = exhausted_report(e, args, hbm)
        if report is None:
            raise
        return report
    return memory_report(compiled, hbm)


def compile_prefill(config, mesh_shape, topology: str, *, batch_size: int, seq_len: int) -> dict:
    """Compiles the prefill step (forward over [batch_size, seq_len], logits of the last position)
    for a TPU topology and returns the memory report."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from jaxmodel.model import abstract_model
    from jaxmodel.sharding import check_divisible, logical_to_spec, make_mesh

    devices = tpu_devices(topology)
    mesh = make_mesh(mesh_shape, devices=devices)
    model = abstract_model(config)
    check_divisible(model, mesh)  # every weight and activation dimension vs the mesh, before compiling
    graphdef, state = abstract_state(model, mesh)
    ids = jax.ShapeDtypeStruct(
        (batch_size, seq_len),
        jnp.int32,
        sharding=NamedSharding(mesh, logical_to_spec(("batch", "length"), (batch_size, seq_len), mesh)),
    )

    def prefill(state, input_ids):
        model = nnx.merge(graphdef, state)
        h, _ = model.hidden(input_ids)
        return model.unembed(h[:, -1:])

    with jax.set_mesh(mesh):
        report = compile_and_report(jax.jit(prefill), (state, ids), hbm_bytes(devices[0]))
    return {
        "mode": "prefill",
        "topology": topology,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "batch_size": batch_size,
        "seq_len": seq_len,
        **report,
    }
