"""Sharding on 8 simulated CPU devices: rules, placement at load time, and sharded == single-device logits."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxmodel import convert, from_pretrained, import_hf
from jaxmodel.sharding import MeshShape, ShardingError, auto_mesh, describe, logical_to_spec, make_mesh

from ..conftest import PARITY_CONFIGS

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)]
AXES = ("data", "fsdp", "tensor")  # a user's mesh may leave out `context` (MESH_AXES has it, size 1 by default)


def _logits(model, ids, mesh=None):
    forward = nnx.jit(lambda m, x: m(x))
    if mesh is None:
        return np.asarray(forward(model, ids))
    with jax.set_mesh(auto_mesh(mesh)):
        return np.asarray(forward(model, ids))


@pytest.fixture(scope="module")
def reference(hf_checkpoints):
    path = hf_checkpoints["normistral_gqa"]  # 8 query heads, 2 KV heads: tensor=4 and 8 exceed the KV heads
    ids = np.random.default_rng(0).integers(0, 1024, size=(8, 64))
    return path, ids, _logits(from_pretrained(path, progress=False), ids)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_logits_equal_single_device(reference, shape):
    path, ids, expected = reference
    mesh = jax.make_mesh(shape, AXES)  # the public contract: a plain jax.make_mesh mesh
    model = from_pretrained(path, mesh=mesh, progress=False)
    q = model.layers.self_attn.q_proj[...]
    assert q.sharding.mesh.shape == dict(zip(AXES, shape))
    np.testing.assert_allclose(_logits(model, ids, mesh), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", MESHES)
def test_the_model_runs_under_jax_set_mesh_of_a_plain_make_mesh(reference, shape):
    """JAX's own idiom: `jax.make_mesh` (Explicit axes) and `jax.set_mesh`, with no auto_mesh; input ids as
    NumPy and as an array explicitly sharded over the batch axes. Single-device logits within 1e-5."""
    path, ids, expected = reference
    mesh = jax.make_mesh(shape, AXES)
    assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    model = from_pretrained(path, mesh=mesh, progress=False)
    forward = nnx.jit(lambda m, x: m(x))
    with jax.set_mesh(mesh):
        plain = np.asarray(forward(model, ids))
        sharded_ids = jax.device_put(ids, jax.NamedSharding(mesh, P(("data", "fsdp"))))
        typed = np.asarray(forward(model, sharded_ids))
        hidden, _ = nnx.jit(lambda m, x: m.hidden(x))(model, ids)
    np.testing.assert_allclose(plain, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(typed, expected, atol=1e-5, rtol=0)
    assert hidden.shape == (*ids.shape, 128)


def test_fsdp_really_splits_every_weight(reference):
    path, _, _ = reference
    model = from_pretrained(path, mesh=make_mesh((1, 8, 1)), progress=False)
    _, state = nnx.split(model)
    for p, var in nnx.to_flat_state(state):
        array = var.get_value()
        shards = array.addressable_shards
        assert len(shards) == 8
        per_device = [s.data.nbytes for s in shards]
        if "embed" in var.get_metadata()["out_sharding"]:
            assert per_device == [array.nbytes // 8] * 8, p
        else:  # norms are replicated
            assert per_device == [array.nbytes] * 8, p


def test_tensor_parallel_replicates_kv_heads_beyond_their_count(reference):
    path, _, _ = reference
    mesh = make_mesh((1, 1, 8))
    model = from_pretrained(path, mesh=mesh, progress=False)
    specs = {p: spec for p, _, spec in describe(model, mesh)}
    assert specs["layers/self_attn/q_proj"] == P(None, None, "tensor", None)  # 8 heads / 8
    assert specs["layers/self_attn/k_proj"] == P(None, None, None, None)  # 2 KV heads < 8: replicated
    assert specs["layers/mlp/gate_proj"] == P(None, None, "tensor")
    assert specs["lm_head"] == P(None, "tensor")
    k = model.layers.self_attn.k_proj[...]
    assert all(s.data.shape == k.shape for s in k.addressable_shards)


def test_loading_places_only_shards_never_a_whole_parameter(reference, monkeypatch):
    """Every host buffer handed to a device (`make_array_from_callback`'s callback) is that device's
    shard, not the full parameter."""
    path, _, _ = reference
    placed = []
    real_make = jax.make_array_from_callback

    def recording_make(shape, sharding, callback, *a, **k):
        def recording_callback(index):
            out = callback(index)
            placed.append(np.shape(out))
            return out
        return real_make(shape, sharding, recording_callback, *a, **k)

    monkeypatch.setattr(convert.jax, "make_array_from_callback", recording_make)
    model = from_pretrained(path, mesh=make_mesh((1, 8, 1)), progress=False)
    _, state = nnx.split(model)
    full_shapes = {tuple(v.shape) for _, v in nnx.to_flat_state(state) if "embed" in v.get_metadata()["out_sharding"]}
    assert placed and not full_shapes & set(placed)
    assert len(placed) >= len(list(nnx.to_flat_state(state)))  # every parameter placed this way


def test_orbax_checkpoint_restores_onto_other_meshes(hf_checkpoints, reference, tmp_path):
    path, ids, expected = reference
    ckpt = str(tmp_path / "orbax")
    import_hf(path, ckpt, progress=False)
    for shape in [(1, 8, 1), (2, 1, 4)]:
        mesh = make_mesh(shape)
        model = from_pretrained(ckpt, mesh=mesh, progress=False)
        spec = model.layers.mlp.up_proj[...].sharding.spec
        assert spec == logical_to_spec(("layers", "embed", "mlp"), (2, 128, 352), mesh)
        np.testing.assert_allclose(_logits(model, ids, mesh), expected, atol=1e-5, rtol=0)


def test_rules_refuse_two_logical_axes_on_one_mesh_axis():
    mesh = make_mesh((1, 2, 4))
    with pytest.raises(ShardingError, match="'q_heads' and 'mlp' both map to mesh axis 'tensor'"):
        logical_to_spec(("q_heads", "mlp"), (8, 8), mesh)
    with pytest.raises(ShardingError, match="no sharding rule"):
        logical_to_spec(("nonsense",), (8,), mesh)


def test_mesh_shape_resolves_minus_one_and_rejects_bad_sizes():
    assert MeshShape(2, -1, 2).resolve(8) == (2, 2, 1, 2)  # in MESH_AXES order: data, fsdp, context, tensor
    assert make_mesh({"data": 1, "fsdp": -1, "tensor": 2}).shape == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ShardingError, match="at most one axis"):
        MeshShape(-1, -1, 1).resolve(8)
    with pytest.raises(ShardingError, match="needs 12 devices, 8 available"):
        MeshShape(3, 4, 1).resolve(8)
    with pytest.raises(ShardingError, match="not divisible by 3"):
        MeshShape(3, -1, 1).resolve(8)


def test_batch_that_does_not_divide_the_data_axis_is_replicated():
    mesh = make_mesh((8, 1, 1))
    assert logical_to_spec(("batch", "length", "act_embed"), (1, 16, 128), mesh) == P(None, None, None)
    assert logical_to_spec(("batch", "length", "act_embed"), (16, 16, 128), mesh) == P("data", None, None)
    assert PARITY_CONFIGS["normistral_gqa"].num_key_value_heads == 2


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 1, 8)])
def test_splash_kernel_runs_per_device_under_a_mesh(shape):
    """Pallas kernels cannot be partitioned by XLA: under a mesh, splash runs in shard_map (batch over
    data x fsdp, heads over tensor when the KV heads divide, else head-replicated) and must still equal
    the single-device reference."""
    from jaxmodel import MistralConfig, init_model
    from jaxmodel.sharding import shard_model

    cfg = MistralConfig.tiny(num_hidden_layers=1, head_dim=128, num_attention_heads=4, num_key_value_heads=2)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(4, 256))
    expected = _logits(init_model(cfg.replace(attention_impl="xla"), seed=3), ids)
    mesh = make_mesh(shape)
    model = shard_model(init_model(cfg.replace(attention_impl="splash"), seed=3), mesh)
    np.testing.assert_allclose(_logits(model, ids, mesh), expected, atol=1e-5, rtol=0)
