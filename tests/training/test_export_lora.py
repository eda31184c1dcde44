"""`export-lora WORKDIR OUT` (training.lora_train.export_lora): a LoRA run's latest adapters as a PEFT directory.

- A tiny float32 LoRA run (rank 4, rsLoRA, four of the seven projections) trains a few steps; its export loads
  with the real `peft.PeftModel.from_pretrained` onto transformers' MistralForCausalLM built from the same base,
  whose logits equal our model's (the checkpoint's adapters merged into the base) within 1e-4, and differ from
  the base's (the trained adapters are what was exported). The same from and to gs:// (the GCS emulator).
- Bad inputs to the real `normistral export-lora` (a missing workdir, one with no checkpoint, a full
  fine-tuning run's, an OUT that is not empty): one line `normistral: error: ...`, exit 2, nothing written.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers
from flax import nnx

from jaxmodel import from_pretrained, storage
from jaxmodel.lora import TRAINABLE, LoraConfig, add_lora, merge_lora
from training.lora_train import export_lora
from training.train import run_training

from .test_lora_train import NAME, RandomBatches, _yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3
LORA = {"rank": 4, "alpha": 8, "rslora": True, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}
SHORT = {"steps": STEPS}


@pytest.fixture(scope="module")
def base_dir(hf_checkpoints):
    return hf_checkpoints[NAME]


@pytest.fixture(scope="module")
def lora_run(base_dir, tmp_path_factory):
    """The workdir of a finished 3-step LoRA run over the tiny base (learning rate 1e-2: B moves off zero)."""
    root = tmp_path_factory.mktemp("lora-run")
    config = _yaml(root / "run.yaml", base_dir, LORA, train=SHORT, optimizer={"learning_rate": 1e-2})
    vocab = json.load(open(os.path.join(base_dir, "config.json")))["vocab_size"]
    workdir = str(root / "run")
    assert run_training(config, workdir, datasets=(RandomBatches(vocab), None))["step"] == STEPS
    return workdir


@pytest.fixture(scope="module")
def ids(base_dir):
    vocab = json.load(open(os.path.join(base_dir, "config.json")))["vocab_size"]
    return np.random.default_rng(1).integers(0, vocab, size=(2, 24))


def _our_merged_logits(base_dir, step_dir, ids):
    """Our model: the base, the checkpoint's adapters (read by Orbax here, not by export_lora), merged."""
    model = from_pretrained(base_dir, dtype="float32")
    add_lora(model, LoraConfig(rank=4, alpha=8, rslora=True, target_modules=tuple(LORA["target_modules"])),
             nnx.Rngs(0))
    adapters = nnx.state(model, TRAINABLE)
    saved = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "params"))  # on the saving run's 8 devices
    nnx.replace_by_pure_dict(adapters, jax.tree.map(np.asarray, saved))
    nnx.update(model, adapters)
    return np.asarray(merge_lora(model)(ids))


def _peft_logits(base_dir, adapter_dir, ids):
    hf = transformers.MistralForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        base = hf(torch.as_tensor(ids)).logits.numpy()
        model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
        return model(torch.as_tensor(ids)).logits.numpy(), base


def _check_adapter(adapter_dir, base_dir, step_dir, ids):
    config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
    assert sorted(config["target_modules"]) == sorted(LORA["target_modules"])
    assert config["base_model_name_or_path"] == base_dir
    theirs, base = _peft_logits(base_dir, adapter_dir, ids)
    ours = _our_merged_logits(base_dir, step_dir, ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert np.abs(theirs - base).max() > 1e-2  # the trained adapters change the logits: they were exported


def test_exported_adapter_loads_in_peft_with_our_logits(lora_run, base_dir, ids, tmp_path):
    out = str(tmp_path / "adapter")
    summary = export_lora(lora_run, out)
    assert summary.startswith(f"export-lora: wrote {out} (PEFT LoRA adapter: rank 4") and "step 3" in summary
    assert "\n" not in summary
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["adapter"]  # no temporary left beside it
    _check_adapter(out, base_dir, os.path.join(lora_run, "checkpoints", str(STEPS)), ids)


def test_export_lora_reads_and_writes_gs_paths(lora_run, base_dir, ids, gcs_bucket, tmp_path):
    step_dir = os.path.join(lora_run, "checkpoints", str(STEPS))
    remote_step = f"{gcs_bucket}/run/checkpoints/{STEPS}"
    storage.upload_dir(step_dir, remote_step)
    storage.write_text(f"{remote_step}/commit_success.txt", "")  # what Orbax writes last on gs://
    summary = export_lora(f"{gcs_bucket}/run", f"{gcs_bucket}/adapter")
    assert f"wrote {gcs_bucket}/adapter " in summary
    assert storage.is_committed(f"{gcs_bucket}/adapter")
    local = str(tmp_path / "adapter")
    storage.copy_dir(f"{gcs_bucket}/adapter", local)
    _check_adapter(local, base_dir, step_dir, ids)


@pytest.fixture(scope="module")
def full_run(base_dir, tmp_path_factory):
    """The workdir of a 1-step full fine-tuning run (no lora: section)."""
    root = tmp_path_factory.mktemp("full-run")
    config = _yaml(root / "run.yaml", base_dir, None, train={**SHORT, "steps": 1})
    vocab = json.load(open(os.path.join(base_dir, "config.json")))["vocab_size"]
    workdir = str(root / "run")
    run_training(config, workdir, datasets=(RandomBatches(vocab), None))
    return workdir


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "normistral", "export-lora", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case", ["missing", "no_checkpoint", "full_run", "out_not_empty"])
def test_bad_export_lora_inputs_are_one_line_exit_2_and_write_nothing(case, lora_run, full_run, tmp_path):
    workdir, out = lora_run, str(tmp_path / "out" / "adapter")
    if case == "missing":
        workdir = str(tmp_path / "nowhere")
        needle = f"{workdir}: the workdir does not exist"
    elif case == "no_checkpoint":
        workdir = str(tmp_path / "empty")
        os.makedirs(os.path.join(workdir, "checkpoints"))
        needle = f"{workdir}: no checkpoint there"
    elif case == "full_run":
        workdir = full_run
        needle = f"{workdir}: the checkpoints there are of a full fine-tuning run, not LoRA adapters"
    else:
        os.makedirs(out)
        with open(os.path.join(out, "keep.txt"), "w") as f:
            f.write("mine")
        needle = f"{out}: output directory already exists and is not empty"
    code, err = _cli(workdir, out)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("normistral: error: ") and needle in last, last
    if case == "out_not_empty":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not os.path.exists(os.path.dirname(out))  # refused before OUT (or its parent) is made
