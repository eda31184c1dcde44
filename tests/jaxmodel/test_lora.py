"""LoRA (jaxmodel/lora.py) against the real PEFT on transformers' MistralForCausalLM, float32.

Adapters have random non-zero A and B (PEFT's init_lora_weights=False, or B overwritten here), so every
comparison exercises the low-rank path; tolerances are the acceptance list's (logits 1e-4, gradients 1e-4
relative, merged logits 1e-5).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxmodel import from_pretrained
from jaxmodel.lora import (
    FROZEN,
    TARGETS,
    LoraConfig,
    LoraError,
    adapters,
    add_lora,
    has_lora,
    load_peft_adapter,
    merge_lora,
    save_peft_adapter,
    set_lora_dropout_key,
)
from jaxmodel.model import unstack_layers
from jaxmodel.sharding import make_mesh, model_shardings

from ..conftest import PARITY_CONFIGS

NAME = "normistral_gqa"  # 4:1 GQA, head_dim != hidden / heads: q/o kernels have two head axes
ATTN, MLP, ALL = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"), tuple(TARGETS)
PEFT_KEY = "base_model.model.model.layers.{i}.{sub}.{name}.lora_{ab}.weight"


@pytest.fixture(scope="module")
def base_dir(hf_checkpoints):
    return hf_checkpoints[NAME]


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    cfg = PARITY_CONFIGS[NAME]
    return rng.integers(0, cfg.vocab_size, size=(2, 24)), rng.integers(0, cfg.vocab_size, size=(2, 24))


def _hf(path):
    return transformers.MistralForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)


def _peft_model(path, rank, targets, rslora, seed=0, alpha=None):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets), use_rslora=rslora,
                             init_lora_weights=False)  # random A and B (kaiming-uniform both)
    return peft.get_peft_model(_hf(path), config).eval()


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


@nnx.jit  # one jitted function: a model structure seen before reuses its compile
def _forward(model, ids):
    return model(ids)


def _logits(model, ids):
    return np.asarray(_forward(model, ids))


def _ours(path, unstacked=False, **options):
    model = from_pretrained(path, progress=False, **options)
    return unstack_layers(model) if unstacked else model


@pytest.fixture(scope="module")
def peft_dir(base_dir, tmp_path_factory):
    """A PEFT-saved adapter (rank 4, all seven projections, rsLoRA) and its PEFT model."""
    out = str(tmp_path_factory.mktemp("peft") / "adapter")
    model = _peft_model(base_dir, 4, ALL, True, seed=11)
    model.save_pretrained(out)
    return out, model


CASES = [  # rank, targets, rslora, model options
    (1, ATTN, False, {}),
    (4, MLP, True, {"unstacked": True}),
    (8, ALL, False, {"scan_layers": False}),
    (8, ALL, True, {"unstacked": True}),
]


@pytest.mark.parametrize("rank,targets,rslora,options", CASES)
def test_peft_saved_adapter_loads_here_with_peft_logits(base_dir, batch, tmp_path, rank, targets, rslora, options):
    ids = batch[0]
    reference = _peft_model(base_dir, rank, targets, rslora, seed=rank)
    reference.save_pretrained(str(tmp_path / "a"))
    expected = _torch_logits(reference, ids)
    model = _ours(base_dir, **options)
    base = _logits(model, ids)
    cfg = load_peft_adapter(model, str(tmp_path / "a"))
    assert (cfg.rank, cfg.alpha, cfg.rslora, set(cfg.target_modules)) == (rank, 2 * rank, rslora, set(targets))
    assert {name for _, name, _, _ in adapters(model)} == set(targets)
    logits = _logits(model, ids)
    assert np.abs(expected - base).max() > 1e-2  # the adapters change the output noticeably
    assert np.abs(logits - expected).max() <= 1e-4


@pytest.mark.parametrize("unstacked", [False, True])
def test_adapter_saved_here_loads_in_peft_with_same_logits(base_dir, batch, tmp_path, unstacked):
    ids = batch[0]
    cfg = LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"), rslora=True)
    model = add_lora(_ours(base_dir, unstacked), cfg, nnx.Rngs(3))
    for k, (*_, adapter) in enumerate(adapters(model)):  # B is zeros after add_lora: make it count
        adapter.b.set_value(0.05 * jax.random.normal(jax.random.key(k), adapter.b.shape))
    ours = _logits(model, ids)
    out = str(tmp_path / "exported")
    save_peft_adapter(model, cfg, out, base_model_name_or_path=base_dir)
    assert sorted(os.listdir(tmp_path)) == ["exported"]  # no temporary left beside it
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    written = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (4, 8, True)
    assert written["base_model_name_or_path"] == base_dir
    theirs = peft.PeftModel.from_pretrained(_hf(base_dir), out).eval()
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 8 * 32)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (2 * 32, 4)
    expected = _torch_logits(theirs, ids)
    assert np.abs(expected - _torch_logits(_hf(base_dir), ids)).max() > 1e-2  # PEFT applied the adapters
    assert np.abs(ours - expected).max() <= 1e-4
    with pytest.raises(ValueError, match=f"^{out}: output directory already exists and is not empty$"):
        save_peft_adapter(model, cfg, out)
    with pytest.raises(LoraError, match=r"^the model's adapters have rank \[4\], the LoraConfig says 8$"):
        save_peft_adapter(model, LoraConfig(rank=8, target_modules=cfg.target_modules), str(tmp_path / "r8"))
    with pytest.raises(LoraError, match=r"^the model's adapters are on \['down_proj', 'o_proj', 'q_proj', 'v_proj'\]"):
        save_peft_adapter(model, LoraConfig(rank=4), str(tmp_path / "all"))
    assert sorted(os.listdir(tmp_path)) == ["exported"]  # the refused saves wrote nothing


def _torch_grads(model, ids, targets):
    model.zero_grad()
    logits = model(torch.as_tensor(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets).reshape(-1))
    loss.backward()
    grads = {n.replace(".default", ""): p.grad.numpy() for n, p in model.named_parameters() if "lora_" in n}
    return loss.item(), grads


def test_adapter_gradients_match_pytorch(base_dir, peft_dir, batch):
    path, reference = peft_dir
    ids, targets = batch
    ref_loss, ref_grads = _torch_grads(reference, ids, targets)
    model = _ours(base_dir, remat="full")  # the scanned stack with remat, as training runs it
    cfg = load_peft_adapter(model, path)

    def loss_fn(m):
        logp = jax.nn.log_softmax(m(ids), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1))

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    flat = {tuple(str(p) for p in path): v[...] for path, v in nnx.to_flat_state(grads)}
    assert len(flat) == 2 * len(ALL)  # gradients of the adapters only: the base gets none
    assert len(ref_grads) == 2 * len(ALL) * PARITY_CONFIGS[NAME].num_hidden_layers
    r = cfg.rank
    for name, (sub, _) in TARGETS.items():
        a, b = (np.asarray(flat[("layers", sub, f"{name}_lora", ab)]) for ab in "ab")
        for i in range(a.shape[0]):
            for ab, ours in (("A", a[i].reshape(-1, r).T), ("B", b[i].reshape(r, -1).T)):
                ref = ref_grads[PEFT_KEY.format(i=i, sub=sub, name=name, ab=ab)]
                assert np.abs(ref).max() > 0
                assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), f"{name} layer {i} lora_{ab}"


@pytest.mark.parametrize("unstacked", [False, True])
def test_merge_lora_matches_peft_merge_and_unload(base_dir, peft_dir, batch, unstacked):
    path, _ = peft_dir
    ids = batch[0]
    expected = _torch_logits(peft.PeftModel.from_pretrained(_hf(base_dir), path).merge_and_unload().eval(), ids)
    model = _ours(base_dir, unstacked)
    plain_paths = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
    load_peft_adapter(model, path)
    merge_lora(model)
    assert not has_lora(model) and not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model))} == plain_paths  # the plain model again
    assert np.abs(_logits(model, ids) - expected).max() <= 1e-5


def test_unstack_layers_keeps_the_adapters(base_dir, peft_dir, batch):
    path, _ = peft_dir
    ids = batch[0]
    model = _ours(base_dir)
    load_peft_adapter(model, path)
    set_lora_dropout_key(model, jax.random.key(0))  # the per-layer dropout keys are sliced too (rate 0 here)
    stacked = {(name, ab): np.asarray(getattr(adapter, ab)[...]) for _, name, _, adapter in adapters(model)
               for ab in "ab"}
    expected = _logits(model, ids)
    unstack_layers(model)
    per_layer = adapters(model)
    assert len(per_layer) == 2 * len(ALL) and {index for index, *_ in per_layer} == {0, 1}
    for index, name, _, adapter in per_layer:
        assert hasattr(adapter, "dropout_key")
        for ab in "ab":
            np.testing.assert_array_equal(np.asarray(getattr(adapter, ab)[...]), stacked[name, ab][index])
    assert adapter.a.get_metadata()["out_sharding"] == ("mlp", "lora_rank")  # down_proj, without "layers"
    np.testing.assert_allclose(_logits(model, ids), expected, atol=1e-6, rtol=0)


def test_adapters_are_the_trainable_set_with_logical_axes_and_peft_init(base_dir, batch):
    ids = batch[0]
    model = _ours(base_dir)
    base_state = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    base = _logits(model, ids)
    add_lora(model, LoraConfig(rank=8, target_modules=ALL), nnx.Rngs(0))
    trainable = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    assert len(trainable) == 2 * len(ALL)
    frozen = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, FROZEN))}
    assert frozen.keys() == base_state.keys() and all((frozen[p] == base_state[p]).all() for p in frozen)
    q_a = trainable[("layers", "self_attn", "q_proj_lora", "a")]
    o_a = trainable[("layers", "self_attn", "o_proj_lora", "a")]
    o_b = trainable[("layers", "self_attn", "o_proj_lora", "b")]
    assert q_a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank") and q_a.shape == (2, 128, 8)
    assert o_a.get_metadata()["out_sharding"] == ("layers", "q_heads", "head_dim", "lora_rank")
    assert o_b.get_metadata()["out_sharding"] == ("layers", "lora_rank", "embed") and o_b.shape == (2, 8, 128)
    bound = 1 / np.sqrt(128)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a = np.asarray(q_a[...])
    assert np.abs(a).max() <= bound and abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound
    assert all(not np.asarray(v[...]).any() for p, v in trainable.items() if p[-1] == "b")
    np.testing.assert_array_equal(_logits(model, ids), base)  # B = 0: a fresh adapter changes nothing
    shardings = model_shardings(model, make_mesh((1, 4, 2)))  # adapters follow the base's rules
    assert tuple(shardings["layers"]["self_attn"]["q_proj_lora"]["a"].spec) == (None, "fsdp", None)
    assert tuple(shardings["layers"]["self_attn"]["q_proj_lora"]["b"].spec) == (None, None, "tensor", None)


def test_dropout_only_with_a_key(base_dir, batch):
    ids = batch[0]
    model = add_lora(_ours(base_dir), LoraConfig(rank=4, dropout=0.5, target_modules=ALL), nnx.Rngs(0))
    for k, (*_, adapter) in enumerate(adapters(model)):
        adapter.b.set_value(0.05 * jax.random.normal(jax.random.key(k), adapter.b.shape))
    deterministic = _logits(model, ids)
    set_lora_dropout_key(model, jax.random.key(1))
    first, again = _logits(model, ids), _logits(model, ids)
    set_lora_dropout_key(model, jax.random.key(2))
    other = _logits(model, ids)
    set_lora_dropout_key(model, None)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - deterministic).max() > 1e-3 and np.abs(first - other).max() > 1e-3
    np.testing.assert_array_equal(_logits(model, ids), deterministic)


def test_lora_over_an_int8_base_equals_its_dequantized_base(base_dir, peft_dir, batch):
    from jaxmodel.quant import quantize_model

    path, _ = peft_dir
    ids = batch[0]
    quantized = quantize_model(_ours(base_dir), "int8")
    dequantized = _ours(base_dir)
    target = dict(nnx.to_flat_state(nnx.state(dequantized)))
    for p, var in nnx.to_flat_state(nnx.state(quantized)):
        if not isinstance(var[...], jax.Array):  # a QArray: the float weight it stands for
            target[p].set_value(var[...].astype(jnp.float32))
    for model in (quantized, dequantized):
        load_peft_adapter(model, path)
    np.testing.assert_allclose(_logits(quantized, ids), _logits(dequantized, ids), atol=1e-5)
    with pytest.raises(LoraError, match="^cannot merge LoRA into the quantized q_proj"):
        merge_lora(quantized)


# -- bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,message", [
    ({"rank": 0}, "LoRA rank must be a positive integer, got 0"),
    ({"rank": -3}, "LoRA rank must be a positive integer, got -3"),
    ({"rank": 2.5}, "LoRA rank must be a positive integer, got 2.5"),
    ({"target_modules": ("q_proj", "lm_head")}, "unknown LoRA target module 'lm_head' (known: q_proj k_proj"),
    ({"target_modules": ()}, "LoRA target_modules is empty"),
    ({"dropout": 1.0}, "LoRA dropout must be in [0, 1), got 1.0"),
])
def test_bad_lora_config_is_one_line_error(options, message):
    with pytest.raises(LoraError) as e:
        LoraConfig(**options)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _edit_config(directory, **fields):
    path = os.path.join(directory, "adapter_config.json")
    config = json.load(open(path))
    config.update(fields)
    json.dump(config, open(path, "w"))


def _copy(src, dst):
    os.makedirs(dst)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as i, open(os.path.join(dst, f), "wb") as o:
            o.write(i.read())
    return dst


def test_bad_adapter_directories_are_one_line_errors_and_change_nothing(base_dir, hf_checkpoints, peft_dir, tmp_path):
    good, _ = peft_dir
    weights = "adapter_model.safetensors"
    other = add_lora(_ours(hf_checkpoints["mqa"]), LoraConfig(rank=4), nnx.Rngs(0))  # 4 heads of 32, 1 kv head
    save_peft_adapter(other, LoraConfig(rank=4), str(tmp_path / "mqa"))
    cases = {}
    cases[str(tmp_path / "none")] = f"{tmp_path / 'none'}: not a PEFT adapter directory (no such directory)"
    os.makedirs(tmp_path / "empty")
    cases[str(tmp_path / "empty")] = f"{tmp_path / 'empty'}: not a PEFT adapter directory (no adapter_config.json)"
    cases[str(tmp_path / "mqa")] = (f"{tmp_path / 'mqa' / weights}: tensor base_model.model.model.layers.0.self_attn."
                                    "k_proj.lora_B.weight has shape (32, 4), this model needs (64, 4)")
    d = _copy(good, str(tmp_path / "lm_head"))
    _edit_config(d, target_modules=["q_proj", "lm_head"])
    cases[d] = f"{d}/adapter_config.json: unknown LoRA target module 'lm_head'"
    d = _copy(good, str(tmp_path / "rank0"))
    _edit_config(d, r=0)
    cases[d] = f"{d}/adapter_config.json: LoRA rank must be a positive integer, got 0"
    d = _copy(good, str(tmp_path / "dora"))
    _edit_config(d, use_dora=True)
    cases[d] = f"{d}/adapter_config.json: use_dora=True is not supported"
    d = _copy(good, str(tmp_path / "missing"))
    tensors = load_file(os.path.join(d, weights))
    missing = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != missing}, os.path.join(d, weights))
    cases[d] = f"{d}/{weights}: missing tensor {missing}"
    d = _copy(good, str(tmp_path / "pickle"))
    os.rename(os.path.join(d, weights), os.path.join(d, "adapter_model.bin"))
    cases[d] = f"{d}: adapter_model.bin is a pickle and is not loaded"
    model = _ours(base_dir)
    before = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
    for path, message in cases.items():
        with pytest.raises(LoraError) as e:
            load_peft_adapter(model, path)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), (path, str(e.value))
        assert not has_lora(model) and {p for p, _ in nnx.to_flat_state(nnx.state(model))} == before
    load_peft_adapter(model, good)
    with pytest.raises(LoraError, match="^the model already has LoRA adapters"):
        load_peft_adapter(model, good)
