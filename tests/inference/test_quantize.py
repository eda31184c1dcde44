"""int8 weights: agreement with bfloat16, KL, memory, the 11B arithmetic, and quantized generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from inference import Generator, QArray, generate, param_bytes, quantize_model
from inference.generate import all_logits
from inference.quantize import QUANTIZED, abstract_quantized_state, quantize_array
from jaxmodel import MistralConfig, abstract_model, from_pretrained
from jaxmodel.aot import abstract_state
from jaxmodel.sharding import make_mesh

from .conftest import left_pad, random_prompts


def _logits(model, ids):
    return np.asarray(all_logits(model, ids))


def _kl(p_logits, q_logits) -> float:
    lp, lq = jax.nn.log_softmax(p_logits, -1), jax.nn.log_softmax(q_logits, -1)
    return float((jnp.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def bf16_and_int8(tiny_dir):
    bf16 = from_pretrained(tiny_dir, dtype=jnp.bfloat16, progress=False)
    int8 = quantize_model(from_pretrained(tiny_dir, dtype=jnp.bfloat16, progress=False))
    return bf16, int8


def test_int8_next_tokens_agree_with_bfloat16(tiny_dir, tiny_model, bf16_and_int8):
    bf16, int8 = bf16_and_int8
    ids = np.random.default_rng(0).integers(4, tiny_model.config.vocab_size, size=(8, 48))
    f32, lb, lq = _logits(tiny_model, ids), _logits(bf16, ids), _logits(int8, ids)
    agree = float((lq.argmax(-1) == lb.argmax(-1)).mean())
    kl_int8, kl_bf16 = _kl(lb, lq), _kl(f32, lb)
    print(f"\nint8 vs bf16 over {ids.size} positions: next-token agreement {agree:.3f}, KL {kl_int8:.2e} nats "
          f"(bf16 vs float32: KL {kl_bf16:.2e}); the random model is near-uniform (entropy ~ ln V), "
          f"so argmax agreement is a harsh measure here")
    # Measured: agreement 0.974, KL 8e-6 (bf16 rounding alone: 1e-6). The bounds leave a margin.
    assert agree >= 0.9
    assert kl_int8 <= 1e-4


def test_int8_halves_parameter_memory(bf16_and_int8):
    bf16, int8 = bf16_and_int8
    ratio = param_bytes(int8) / param_bytes(bf16)
    assert ratio <= 0.52, ratio  # tiny model: norms and per-channel scales weigh 3%
    for path in QUANTIZED:
        node = int8
        for key in path:
            node = getattr(node, key)
        value = node[...]
        assert isinstance(value, QArray) and value.q.dtype == jnp.int8, path


def test_int8_11b_arithmetic_on_abstract_shapes():
    config = MistralConfig.normistral_11b_long(dtype="bfloat16", param_dtype="bfloat16")
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, state = abstract_state(abstract_model(config), mesh)
    bf16 = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    int8 = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_quantized_state(state, mesh)))
    assert bf16 == 2 * config.num_params() and 22.8e9 < bf16 < 22.9e9
    assert int8 / bf16 < 0.501  # 11.44 GB: half, plus 0.2 MB of scales per layer


def test_quantize_array_is_symmetric_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (64, 4, 8)) * jnp.arange(1, 33).reshape(4, 8)
    qa = quantize_array(w, (0,))
    assert qa.q.dtype == jnp.int8 and qa.scale.shape == (1, 4, 8)
    assert int(jnp.abs(qa.q).max()) == 127
    np.testing.assert_allclose(np.asarray(qa.astype(jnp.float32)), np.asarray(w), atol=float(qa.scale.max()) / 2)


def test_quantized_generation_single_and_sharded(tiny_dir, bf16_and_int8):
    _, int8 = bf16_and_int8
    prompts = random_prompts(int8.config.vocab_size, (4, 30), seed=2)
    single = generate(int8, *left_pad(prompts), max_new_tokens=8)
    # The accelerator path of Generator.from_pretrained: loaded on one (host) device, quantized there,
    # then placed on the mesh by the rules (int8 values as their parameter, scales along their axes).
    mesh = make_mesh((2, 1, 4))
    host = from_pretrained(tiny_dir, dtype=jnp.bfloat16, progress=False)
    sharded = quantize_model(host, mesh=mesh, place=True)
    scale = sharded.layers.mlp.gate_proj[...].scale
    assert scale.sharding.mesh.shape["tensor"] == 4
    np.testing.assert_array_equal(generate(sharded, *left_pad(prompts), max_new_tokens=8), single)


def test_generator_from_pretrained_int8(tiny_dir):
    gen = Generator.from_pretrained(tiny_dir, quantize="int8", kv_cache_dtype="int8")
    assert isinstance(gen.model.lm_head[...], QArray)
    out = gen.generate(["Hei på deg", "Engelsk: I like cheese."], max_new_tokens=6, stop="\n")
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


# -- streaming quantization at load, and int4 -------------------------------------------------------------


def _flat(model):
    return {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.split(model)[1])}


@pytest.mark.parametrize("chunk_elements", [None, 1000], ids=["whole-tensors", "pieces-of-1000"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_streaming_load_equals_quantizing_after_a_full_load(tiny_dir, mode, chunk_elements):
    from inference.quantize import load_transform

    # Pieces of 1000 values split every matrix of the tiny model (rows of the embedding, heads of q/k/v,
    # output columns of the rest) into several range reads: each piece is quantized on its own.
    transform = load_transform(mode, 32, chunk_elements=chunk_elements)
    streamed = from_pretrained(tiny_dir, dtype=jnp.bfloat16, progress=False, transform=transform)
    after = quantize_model(from_pretrained(tiny_dir, dtype=jnp.bfloat16, progress=False), mode, group_size=32)
    a, b = _flat(streamed), _flat(after)
    assert a.keys() == b.keys()
    for key in a:
        if key in QUANTIZED:
            want = "int8" if key in (("embed_tokens",), ("lm_head",)) else mode  # int4 keeps the tables int8
            assert isinstance(a[key], QArray) and a[key].axis == b[key].axis and a[key].mode == want, key
            np.testing.assert_array_equal(np.asarray(a[key].q), np.asarray(b[key].q))
            np.testing.assert_array_equal(np.asarray(a[key].scale), np.asarray(b[key].scale))
        else:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_streaming_pieces_onto_a_mesh_equal_the_single_device_values(tiny_dir, mode):
    from inference.quantize import load_transform

    # Pieces of 1000 values (7 embedding rows, one q head, ...) do not divide the tensor axis of 4: each is
    # placed replicated and the update writes each device's share into its shard of the part's buffer.
    mesh = make_mesh((2, 1, 4))
    sharded = from_pretrained(tiny_dir, dtype=jnp.bfloat16, progress=False, mesh=mesh,
                              transform=load_transform(mode, 32, chunk_elements=1000))
    after = quantize_model(from_pretrained(tiny_dir, dtype=jnp.bfloat16, progress=False), mode, group_size=32)
    a, b = _flat(sharded), _flat(after)
    for key in (("layers", "self_attn", "q_proj"), ("layers", "mlp", "gate_proj")):  # heads, MLP width on tensor
        assert not a[key].q.sharding.is_fully_replicated, key  # the buffer is sharded, its pieces were not
    for key in QUANTIZED:
        np.testing.assert_array_equal(np.asarray(a[key].q), np.asarray(b[key].q))
        np.testing.assert_array_equal(np.asarray(a[key].scale), np.asarray(b[key].scale))


@pytest.mark.parametrize("mode, in_axes, shape, group", [
    ("int8", (1,), (300, 96), 128), ("int8", (0,), (96, 300), 128), ("int8", (0, 1), (4, 32, 80), 128),
    ("int4", (1,), (50, 256), 128), ("int4", (0, 1), (4, 64, 40), 32), ("int4", (0,), (96, 70), 64)])
def test_host_quantizer_is_bit_identical_to_the_xla_one(mode, in_axes, shape, group):
    from inference.quantize import quantize_numpy

    rng = np.random.default_rng(3)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, shape[-1])).astype(jnp.bfloat16)
    w[0] = 0  # an all-zero channel or group (scale 1)
    w.reshape(-1)[5:40] = (np.arange(35) - 17) * 0.5  # ties at .5 (round half to even), exact absmax
    q, scale = quantize_numpy(w, in_axes, mode, group)
    ref = quantize_array(jnp.asarray(w), in_axes, mode, group)  # XLA on the CPU, as loading did before
    assert q.dtype == ref.q.dtype and scale.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(ref.scale))
    np.testing.assert_array_equal(q.astype(np.int8), np.asarray(ref.q).astype(np.int8))


def _int4_reference(w: np.ndarray, axis: int, group: int) -> np.ndarray:
    """Group-wise symmetric int4 in float64 NumPy: the dequantized weight."""
    w = np.moveaxis(w.astype(np.float64), axis, -1)
    g = w.reshape(*w.shape[:-1], w.shape[-1] // group, group)
    absmax = np.abs(g).max(-1, keepdims=True)
    scale = np.where(absmax > 0, absmax / 7, 1.0)
    deq = (np.clip(np.round(g / scale), -7, 7) * scale).reshape(w.shape)
    return np.moveaxis(deq, -1, axis)


def test_int4_groups_match_a_numpy_reference():
    w = np.asarray(jax.random.normal(jax.random.key(1), (3, 256, 4, 8))) * np.linspace(0.1, 3, 256)[:, None, None]
    qa = quantize_array(jnp.asarray(w, jnp.float32)[0], (0,), "int4", group_size=64)  # [D=256, N, H], D input
    assert qa.q.dtype == jnp.int4 and qa.q.shape == (256, 4, 8) and qa.scale.shape == (4, 4, 8)
    assert qa.axis == -3 and qa.nbytes == 256 * 32 // 2 + 4 * 32 * 4  # half a byte per value
    np.testing.assert_allclose(np.asarray(qa.astype(jnp.float32)), _int4_reference(w[0], 0, 64), rtol=1e-6,
                               atol=1e-6)
    values = np.asarray(qa.q).astype(np.int8)
    assert np.abs(values).max() == 7
    np.testing.assert_allclose(values * np.repeat(np.asarray(qa.scale), 64, axis=0),
                               np.asarray(qa.astype(jnp.float32)), rtol=1e-6)
    # o_proj layout [L, N, H, D] with inputs (N, H): groups along H; scale keeps N; after the layer axis is
    # sliced off (as the scan does) the negative axis still names H.
    o = quantize_array(jnp.asarray(w.reshape(3, 8, 128, 8)), (1, 2), "int4", group_size=32)
    assert o.q.shape == (3, 8, 128, 8) and o.scale.shape == (3, 8, 4, 8)
    np.testing.assert_allclose(np.asarray(o[1].astype(jnp.float32)),
                               _int4_reference(w.reshape(3, 8, 128, 8)[1], 1, 32), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def int4_model(tiny_dir):
    return Generator.from_pretrained(tiny_dir, dtype=jnp.bfloat16, quantize="int4", group_size=32).model


def test_int4_next_tokens_and_kl_against_bfloat16(tiny_model, bf16_and_int8, int4_model):
    bf16, int8 = bf16_and_int8
    ids = np.random.default_rng(0).integers(4, tiny_model.config.vocab_size, size=(8, 48))
    lb, l8, l4 = _logits(bf16, ids), _logits(int8, ids), _logits(int4_model, ids)
    agree4, agree8 = float((l4.argmax(-1) == lb.argmax(-1)).mean()), float((l8.argmax(-1) == lb.argmax(-1)).mean())
    kl4, kl8 = _kl(lb, l4), _kl(lb, l8)
    print(f"\nvs bf16: int4 (group 32) agreement {agree4:.3f}, KL {kl4:.2e}; int8 agreement {agree8:.3f}, KL {kl8:.2e}")
    assert kl8 < kl4 <= 1e-2  # 4 bits lose more than 8, and still little on this near-uniform model
    assert agree4 >= 0.6


def test_int4_quarter_memory_and_sharded_generation(tiny_dir, int4_model):
    bf16 = from_pretrained(tiny_dir, dtype=jnp.bfloat16, progress=False)
    ratio = param_bytes(int4_model) / param_bytes(bf16)
    tables = 2 * int4_model.config.vocab_size * int4_model.config.hidden_size / param_bytes(bf16) * 2  # bf16 share
    # layers: 0.25 + float32 scales per 32 inputs (1/16 of bf16); the int8 tables: 0.5 (+ scales); norms.
    assert ratio <= 0.33 * (1 - tables) + 0.52 * tables + 0.01, (ratio, tables)
    prompts = random_prompts(int4_model.config.vocab_size, (4, 30), seed=2)
    single = generate(int4_model, *left_pad(prompts), max_new_tokens=8)
    mesh = make_mesh((2, 1, 4))  # streamed straight onto the mesh, each part placed by the rules
    # warmup=False: this test is about the sharded int4 weights and the static generate; in the full suite
    # the engine's warm-up compile on this mesh aborted XLA's CPU compiler (not in this file alone; issue 25)
    sharded = Generator.from_pretrained(tiny_dir, dtype=jnp.bfloat16, quantize="int4", group_size=32, mesh=mesh,
                                        warmup=False)
    assert sharded.model.layers[0].mlp.gate_proj[...].q.sharding.mesh.shape["tensor"] == 4  # unstacked on CPU
    np.testing.assert_array_equal(generate(sharded.model, *left_pad(prompts), max_new_tokens=8), single)


def test_int4_11b_arithmetic_on_abstract_shapes():
    config = MistralConfig.normistral_11b_long(dtype="bfloat16", param_dtype="bfloat16")
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    _, state = abstract_state(abstract_model(config), mesh)
    int4 = abstract_quantized_state(state, mesh, "int4")
    from inference.quantize import stored_bytes

    total = sum(stored_bytes(x) for x in jax.tree.leaves(int4))  # int4 counted at half a byte, as XLA stores it
    # 10.92e9 layer weights x 0.5 bytes + one float32 scale per 128 of them (0.34 GB) + the embedding and
    # lm_head in int8 (0.52 GB) + norms.
    assert 6.3e9 < total < 6.4e9, total


def test_cli_quantize_choices_are_the_library_modes():
    import normistral
    from inference.quantize import MODES

    assert normistral.QUANTIZE_CHOICES == MODES
