"""Context parallelism on 8 simulated CPU devices: the `context` mesh axis, the load-balanced order, and
forward logits equal to the single-device run (packed documents crossing shard boundaries) for xla, flash
and splash (interpret mode), mixed with fsdp and tensor, causal, bidirectional and with a sliding window."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmodel import context_parallel as cp
from jaxmodel.config import MistralConfig
from jaxmodel.model import MistralForCausalLM
from jaxmodel.sharding import MESH_AXES, MeshShape, ShardingError, describe, make_mesh, shard_model

# (data, fsdp, tensor, context) as MeshShape's fields.
MESHES = {"context2-fsdp4": (1, 4, 1, 2), "context4-tensor2": (1, 1, 2, 4), "context8": (1, 1, 1, 8),
          "data2-tensor2-context2": (2, 1, 2, 2)}


def _packed(length, batch=2, seed=0):
    """ids, positions, segment ids of rows packed with documents of odd lengths (so they cross every shard
    boundary), a padding tail, and a different packing per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(16, 1024, size=(batch, length)).astype(np.int32)
    seg, pos = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32)
    for b in range(batch):
        start, doc = 0, 1
        while start < length - 7:
            n = min(int(rng.integers(length // 5, length // 2)) | 1, length - 7 - start)
            seg[b, start:start + n], pos[b, start:start + n] = doc, np.arange(n)
            start, doc = start + n, doc + 1
    return ids, pos, seg


def _forward(model, ids, pos, seg, *, causal=True, mesh=None):
    fn = nnx.jit(lambda m, a, p, s: m.unembed(m.hidden(a, p, s, causal=causal)[0]))
    if mesh is None:
        return np.asarray(fn(model, ids, pos, seg))
    c = mesh.shape["context"]
    with jax.set_mesh(mesh):
        out = fn(shard_model(model, mesh), *(cp.balance(x, c) for x in (ids, pos, seg)))
    return cp.unbalance(np.asarray(out), c)


def test_the_mesh_has_a_context_axis_that_no_weight_uses():
    assert MESH_AXES == ("data", "fsdp", "context", "tensor")
    assert MeshShape().context == 1 and MeshShape(2, -1, 2).resolve(8) == (2, 2, 1, 2)  # 3 sizes: as before
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "context": 2})
    assert mesh.shape == {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}
    assert make_mesh((1, -1, 1)).shape == {"data": 1, "fsdp": 8, "tensor": 1}  # context 1: no axis, as before
    model = nnx.eval_shape(lambda: MistralForCausalLM(MistralConfig.tiny(), rngs=nnx.Rngs(0)))
    specs = [spec for _, _, spec in describe(model, mesh)]
    assert specs and not any("context" in str(spec) for spec in specs)
    assert any("fsdp" in str(spec) for spec in specs)


def test_each_shard_holds_two_mirrored_chunks_and_the_same_causal_work():
    for context in (2, 4, 8):
        length = 16 * context
        order = cp.balanced_order(length, context)
        chunk = length // (2 * context)
        shards = order.reshape(context, 2 * chunk)
        for i, shard in enumerate(shards):
            assert shard[:chunk].tolist() == list(range(i * chunk, (i + 1) * chunk))
            mirror = 2 * context - 1 - i
            assert shard[chunk:].tolist() == list(range(mirror * chunk, (mirror + 1) * chunk))
        work = {int((shard[:, None] >= np.arange(length)[None]).sum()) for shard in shards}
        assert len(work) == 1  # causal pairs per shard: all equal
        x = np.arange(3 * length).reshape(3, length)
        np.testing.assert_array_equal(cp.unbalance(cp.balance(x, context), context), x)
        assert (cp.balance(x, context)[:, :chunk] == x[:, :chunk]).all()
    with pytest.raises(ValueError, match="not divisible by 2 x context = 8"):
        cp.balanced_order(100, 4)


def test_check_length_names_the_fix():
    mesh = make_mesh((1, 2, 1, 4))
    with pytest.raises(ShardingError, match=r"train.seq_len=100 is not divisible by 2 x context = 8 .*multiple of 8"):
        cp.check_length(100, mesh, "xla")
    cp.check_length(104, mesh, "xla")
    with pytest.raises(ShardingError, match="multiple of 512"):
        cp.check_length(256, mesh, "splash")
    cp.check_length(100, make_mesh((1, 8, 1)), "xla")  # no context axis: nothing to balance


@pytest.fixture(scope="module")
def model():
    return MistralForCausalLM(MistralConfig.tiny(dtype="float32"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl", ["xla", "flash"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_context_parallel_logits_equal_single_device(model, impl, mesh_name):
    model = nnx.clone(model)
    model.config = MistralConfig.tiny(dtype="float32", attention_impl=impl)
    ids, pos, seg = _packed(256)
    expected = _forward(model, ids, pos, seg)
    got = _forward(model, ids, pos, seg, mesh=make_mesh(MESHES[mesh_name]))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["xla", "flash", "splash"])
def test_bidirectional_and_sliding_window_attention_split_exactly(impl):
    """The masked objective's bidirectional attention, and a sliding window shorter than a shard."""
    ids, pos, seg = _packed(512, seed=1)
    for options, causal in (({}, False), ({"sliding_window": 48}, True)):
        cfg = MistralConfig.tiny(dtype="float32", attention_impl=impl, **options)
        model = MistralForCausalLM(cfg, rngs=nnx.Rngs(1))
        expected = _forward(model, ids, pos, seg, causal=causal)
        got = _forward(model, ids, pos, seg, causal=causal, mesh=make_mesh((1, 2, 1, 4)))
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(1, 4, 1, 2), (1, 1, 1, 8)])
def test_splash_context_parallel_logits_equal_single_device(shape):
    """The splash kernel (Pallas interpreter) with its mask tables split over `context`: 128 tokens per shard."""
    cfg = MistralConfig.tiny(dtype="float32", attention_impl="splash")
    model = MistralForCausalLM(cfg, rngs=nnx.Rngs(2))
    ids, pos, seg = _packed(128 * shape[3], seed=2)
    expected = _forward(model, ids, pos, seg)
    np.testing.assert_allclose(_forward(model, ids, pos, seg, mesh=make_mesh(shape)), expected, atol=1e-5, rtol=0)


def test_context_groups_stay_within_a_host_on_multi_host_slices():
    """make_mesh keeps every context group on one host where the sizes allow (a 4x8x8 v5p slice, 64 hosts:
    fsdp 128 x context 2 is no product of whole torus axes either), so its all-gathers stay on the host."""
    from jaxmodel.aot import tpu_devices

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # as compile-check: another process may hold libtpu
    for topology, shape in (("v5p:4x8x8", (1, -1, 1, 2)), ("v5p:4x4x4", (1, -1, 1, 4))):
        mesh = make_mesh(shape, devices=tpu_devices(topology))
        groups = np.moveaxis(mesh.devices, 2, -1).reshape(-1, shape[3])
        assert all(len({d.process_index for d in g}) == 1 for g in groups)
