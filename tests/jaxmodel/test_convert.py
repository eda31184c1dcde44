"""Converter: bit-exact round trips, transformers loading our exports, and one test per bad input."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from jaxmodel import ConfigError, ConvertError, MistralConfig, export_hf, from_pretrained, import_hf, save_pretrained
from jaxmodel.parity import make_hf_checkpoint
from jaxmodel.storage import StorageError

from ..conftest import PARITY_CONFIGS


def _tensors(directory):
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out


def _assert_bit_exact(a_dir, b_dir):
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(
            a[name].view(torch.uint8) if a[name].dtype == torch.bfloat16 else a[name],
            b[name].view(torch.uint8) if b[name].dtype == torch.bfloat16 else b[name],
        ), name


def _hf_logits(directory, ids):
    model = transformers.MistralForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def test_hf_to_jax_to_hf_is_bit_exact_and_loads_in_transformers(hf_bf16_checkpoint, tmp_path):
    model = from_pretrained(hf_bf16_checkpoint, progress=False)  # bfloat16 file -> float32 params
    out = str(tmp_path / "export")
    save_pretrained(model, out, max_shard_bytes=200_000, progress=False)  # force several shards
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 1
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(files)
    _assert_bit_exact(hf_bf16_checkpoint, out)
    ids = np.random.default_rng(0).integers(0, 1024, size=(1, 40))
    np.testing.assert_array_equal(_hf_logits(out, ids), _hf_logits(hf_bf16_checkpoint, ids))


@pytest.mark.parametrize("name, block_bytes", [("normistral_gqa", None), ("tied", None), ("normistral_gqa", 3000)])
def test_import_export_through_orbax_is_bit_exact(hf_checkpoints, tmp_path, name, block_bytes):
    # block_bytes 3000: every matrix is read and written in several HF row blocks (5 rows of the embedding,
    # one head of q/k/v, ...), as export-hf does for the real model's 0.5 GB embedding and head.
    ckpt, back = str(tmp_path / "orbax"), str(tmp_path / "back")
    import_hf(hf_checkpoints[name], ckpt, progress=False)
    assert os.path.isdir(os.path.join(ckpt, "params"))
    export_hf(ckpt, back, progress=False, **({} if block_bytes is None else {"block_bytes": block_bytes}))
    _assert_bit_exact(hf_checkpoints[name], back)
    ids = np.random.default_rng(1).integers(0, 1024, size=(1, 33))
    np.testing.assert_array_equal(_hf_logits(back, ids), _hf_logits(hf_checkpoints[name], ids))


def test_export_from_a_hugging_face_directory_in_row_blocks_is_bit_exact(hf_bf16_checkpoint, tmp_path):
    back = str(tmp_path / "back")
    export_hf(hf_bf16_checkpoint, back, progress=False, block_bytes=3000)  # sliced safetensors reads
    _assert_bit_exact(hf_bf16_checkpoint, back)


def test_from_pretrained_reads_the_orbax_directory(hf_checkpoints, tmp_path):
    ckpt = str(tmp_path / "orbax")
    import_hf(hf_checkpoints["mqa"], ckpt, progress=False)
    a, b = from_pretrained(hf_checkpoints["mqa"], progress=False), from_pretrained(ckpt, progress=False)
    np.testing.assert_array_equal(
        np.asarray(a.layers.self_attn.k_proj[...]), np.asarray(b.layers.self_attn.k_proj[...])
    )


def test_config_reads_transformers_4_and_5_layouts_and_writes_back():
    v5 = PARITY_CONFIGS["normistral_gqa"].to_hf()
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
    v4["rope_theta"], v4["torch_dtype"] = 1e6, "bfloat16"
    del v5["rope_theta"]
    a, b = MistralConfig.from_hf(v5), MistralConfig.from_hf(v4)
    assert a.rope_theta == b.rope_theta == 1e6 and a.head_dim == 32 and b.torch_dtype == "bfloat16"
    assert MistralConfig.from_hf(a.to_hf()) == a
    no_head_dim = dict(v4)
    del no_head_dim["head_dim"]
    assert MistralConfig.from_hf(no_head_dim).head_dim == 128 // 8  # the fallback only when absent
    real = MistralConfig.from_hf(MistralConfig.normistral_11b_long().to_hf())
    assert real == MistralConfig.normistral_11b_long() and real.head_dim == 128


@pytest.mark.parametrize(
    "change, culprit",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_config_refuses_what_it_cannot_honour(change, culprit):
    with pytest.raises(ConfigError, match=culprit):
        MistralConfig.from_hf({**PARITY_CONFIGS["normistral_gqa"].to_hf(), **change})


# -- bad inputs: one test each -----------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path):
    """A fresh small float32 checkpoint (single safetensors file) that a test may damage."""
    path = str(tmp_path / "hf")
    make_hf_checkpoint(path, MistralConfig.tiny(num_hidden_layers=2), seed=5)
    return path


def _rewrite(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "normistral", *args], capture_output=True, text=True)


def _assert_cli_fails(args, needle, out_dir):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normistral: error:") and needle in lines[0], result.stderr
    parent = os.path.dirname(out_dir)
    assert not os.path.exists(out_dir), "half-written output left behind"
    assert not [f for f in os.listdir(parent) if f.startswith("." + os.path.basename(out_dir))]


def test_missing_config_json(ckpt, tmp_path):
    os.remove(os.path.join(ckpt, "config.json"))
    with pytest.raises(ConfigError, match="config.json not found"):
        from_pretrained(ckpt)
    _assert_cli_fails(["import-hf", ckpt, str(tmp_path / "out")], "config.json", str(tmp_path / "out"))


def test_missing_tensor(ckpt, tmp_path):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConvertError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(ckpt)
    _assert_cli_fails(
        ["import-hf", ckpt, str(tmp_path / "out")], "model.layers.1.mlp.up_proj.weight", str(tmp_path / "out")
    )


def test_unexpected_tensor(ckpt):
    file = _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(4)}))
    message = r"model\.safetensors: unexpected tensor model\.layers\.0\.self_attn\.q_norm"
    with pytest.raises(ConvertError, match=message):
        from_pretrained(ckpt)
    assert os.path.exists(file)


def test_wrong_shape(ckpt, tmp_path):
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 128)}))
    with pytest.raises(ConvertError, match=r"k_proj\.weight has shape \(32, 128\), config.json implies \(64, 128\)"):
        from_pretrained(ckpt)
    _assert_cli_fails(["import-hf", ckpt, str(tmp_path / "o")], "k_proj.weight", str(tmp_path / "o"))


def test_wrong_dtype(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(128, dtype=torch.int32)}))
    with pytest.raises(ConvertError, match=r"model\.norm\.weight has dtype int32"):
        from_pretrained(ckpt)


def test_truncated_safetensors(ckpt, tmp_path):
    file = os.path.join(ckpt, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 1000)
    with pytest.raises(ConvertError, match=r"model\.safetensors: truncated safetensors file: tensor"):
        from_pretrained(ckpt)
    _assert_cli_fails(["import-hf", ckpt, str(tmp_path / "o")], "truncated", str(tmp_path / "o"))


def test_config_that_disagrees_with_tensors(ckpt, tmp_path):
    cfg_file = os.path.join(ckpt, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["intermediate_size"] = 512
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ConvertError, match=r"mlp\.\w+_proj\.weight has shape .* config.json implies"):
        from_pretrained(ckpt)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 352, 3
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ConvertError, match=r"missing tensor model\.layers\.2\."):
        from_pretrained(ckpt)


def test_duplicate_tensor_across_shards(ckpt):
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    save_file(
        {"model.norm.weight": tensors["model.norm.weight"]},
        os.path.join(ckpt, "extra.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(ConvertError, match=r"tensor model\.norm\.weight is also in"):
        from_pretrained(ckpt)


def test_pytorch_bin_needs_the_explicit_flag(tmp_path):
    path = str(tmp_path / "bin")
    make_hf_checkpoint(path, MistralConfig.tiny(num_hidden_layers=1), seed=2)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(tensors, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(ConvertError, match=r"pytorch_model\.bin: PyTorch pickle weights are not loaded by default"):
        from_pretrained(path)
    _assert_cli_fails(["import-hf", path, str(tmp_path / "o")], "--allow-pickle", str(tmp_path / "o"))
    model = from_pretrained(path, allow_pickle=True, progress=False)  # weights_only load of plain tensors
    np.testing.assert_array_equal(np.asarray(model.norm.weight[...]), tensors["model.norm.weight"].numpy())


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    path = str(tmp_path / "evil")
    os.makedirs(path)
    json.dump(MistralConfig.tiny().to_hf(), open(os.path.join(path, "config.json"), "w"))
    marker = tmp_path / "pwned"
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump({"model.norm.weight": _Exploit(marker)}, f)
    with pytest.raises(ConvertError, match="not loaded by default"):
        from_pretrained(path)
    with pytest.raises(ConvertError, match=r"refused by torch\.load\(weights_only=True\)"):
        from_pretrained(path, allow_pickle=True)
    _assert_cli_fails(["import-hf", "--allow-pickle", path, str(tmp_path / "o")], "weights_only", str(tmp_path / "o"))
    assert not marker.exists()


def test_export_refuses_a_non_empty_output_directory(hf_checkpoints, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    model = from_pretrained(hf_checkpoints["mqa"], progress=False)
    with pytest.raises(StorageError, match="already exists and is not empty"):
        save_pretrained(model, str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "user data"
