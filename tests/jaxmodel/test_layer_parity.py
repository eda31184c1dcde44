"""`normistral parity` layer by layer (jaxmodel.parity.compare_layers) against today's whole-model compare,
and a corrupted layer found by name."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxmodel.parity import compare_layers, compare_logits

from ..conftest import PARITY_CONFIGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_layer_by_layer_agrees_with_the_whole_model_compare(hf_checkpoints, name):
    path = hf_checkpoints[name]
    layers = compare_layers(path, path, length=128)
    whole = compare_logits(path, path, length=128)
    stages = [s["stage"] for s in layers["stages"]]
    n = PARITY_CONFIGS[name].num_hidden_layers
    assert stages == ["embeddings", *[f"layer {i}" for i in range(n)], "final norm", "logits"]
    assert layers["worst"]["max_abs_diff"] < 1e-5 and whole["max_abs_logit_diff"] < 1e-5
    # The end-to-end figure (our own chain of layers) is the whole-model compare's figure up to float32
    # rounding: both are ~1e-6 on logits, and the whole model, compiled as one program, rounds differently
    # from layers compiled one at a time (measured: within 1e-6 for three configs, 1.1e-6 for normistral_gqa).
    assert abs(layers["max_abs_logit_diff"] - whole["max_abs_logit_diff"]) <= 1.5e-6


@pytest.mark.parametrize("name", ["normistral_gqa", "tied"])
def test_blocked_embedding_and_head_give_the_same_report(hf_checkpoints, name):
    """20 kB blocks: the embedding is read and the logits made in 54 blocks of 19 vocabulary entries (the
    default block holds this vocabulary whole): the same figures, the embedding gather exactly."""
    path = hf_checkpoints[name]
    whole = compare_layers(path, path, length=128)
    blocked = compare_layers(path, path, length=128, block_bytes=20_000)
    assert [s["stage"] for s in blocked["stages"]] == [s["stage"] for s in whole["stages"]]
    assert blocked["stages"][0] == whole["stages"][0]
    for a, b in zip(blocked["stages"], whole["stages"]):
        for k in ("max_abs_diff", "end_to_end", "max_abs"):
            assert abs(a[k] - b[k]) <= 1e-6, (a, b)


def _corrupt(src, dst, tensor):
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = load_file(file)
    tensors[tensor] = tensors[tensor] + np.float32(0.01) * np.sign(tensors[tensor])
    save_file(tensors, file, metadata={"format": "pt"})


def test_a_corrupted_layer_is_named(hf_checkpoints, tmp_path):
    path = hf_checkpoints["tied"]  # 3 layers
    bad = str(tmp_path / "bad")
    _corrupt(path, bad, "model.layers.1.mlp.down_proj.weight")
    report = compare_layers(path, bad, length=64)
    by_stage = {s["stage"]: s["max_abs_diff"] for s in report["stages"]}
    assert report["worst"]["stage"] == "layer 1" and by_stage["layer 1"] > 1e-3
    assert by_stage["layer 0"] < 1e-5 and by_stage["layer 2"] < 1e-5  # fed the reference's inputs: unaffected
    # The CLI: one line naming the layer, exit 1 (a failed check, as before); the report as JSON on stdout.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "normistral", "parity", path, bad, "--length", "64"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("normistral: error: layer 1 differs by ")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["worst"]["stage"] == "layer 1"


def test_layer_by_layer_reads_an_import_hf_directory(hf_checkpoints, tmp_path):
    from jaxmodel import import_hf

    path = hf_checkpoints["normistral_gqa"]
    ckpt = str(tmp_path / "orbax")
    import_hf(path, ckpt, progress=False)
    report = compare_layers(path, ckpt, length=64)
    assert report["worst"]["max_abs_diff"] < 1e-5
