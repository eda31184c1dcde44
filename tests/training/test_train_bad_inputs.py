"""`normistral train` and `compile-check` on inputs they must refuse or handle: an occupied or parentless
train.export_hf (refused before training), train.steps below the checkpoint (refused; equal: nothing to
do), a failed run's own empty workdir (removed; a user's kept), bfloat16 parameters (they train, under
both nonfinite modes), a Llama config.json with a sliding_window (ignored as transformers ignores it),
and compile-check with cuDNN attention on a TPU or a program too large to compile.

Refusals go through the real CLI in subprocesses (exit code, the last stderr line, no traceback, nothing
left behind); the training runs that only need their numbers call `run_training` in this process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from training.train import NonFiniteError, run_training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny-cpu.yaml")


def _cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NORMISTRAL_FAULTS")}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "normistral", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _train(workdir, *overrides):
    args = ["train", "--config", CONFIG, "--workdir", str(workdir)]
    for item in overrides:
        args += ["--set", item]
    return _cli(*args)


def _refused(proc, *needles):
    """The one-line refusal: exit 2, `normistral: error: ...` last, each needle in it, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("normistral: error: "), last
    for needle in needles:
        assert needle in last, (needle, last)
    assert "Traceback" not in proc.stderr
    return last


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """Two steps of the tiny config (checkpoints 1 and 2), building its tokenizer and data; (workdir,
    overrides that point another run at that data)."""
    workdir = str(tmp_path_factory.mktemp("bad_inputs") / "run")
    run_training(CONFIG, workdir, ["train.steps=2", "train.eval_every=0", "checkpoint.every=1"])
    data = [f"data.dir={workdir}/data", f"data.eval_dir={workdir}/data-heldout", "train.eval_every=0"]
    return workdir, data


# -- item 3: train.export_hf is checked before training ----------------------------------------------------


def test_an_occupied_export_hf_is_refused_before_training(base_run, tmp_path):
    occupied = tmp_path / "hf"
    occupied.mkdir()
    (occupied / "config.json").write_text("{}")
    workdir = tmp_path / "new" / "run"
    proc = _train(workdir, *base_run[1], "train.steps=2", f"train.export_hf={occupied}")
    _refused(proc, "train.export_hf", str(occupied), "not empty")
    assert os.listdir(occupied) == ["config.json"] and not (tmp_path / "new").exists()  # nothing trained


def test_an_absolute_export_hf_under_a_missing_directory_is_refused(base_run, tmp_path):
    target = tmp_path / "no" / "such" / "hf"
    proc = _train(tmp_path / "run", *base_run[1], "train.steps=2", f"train.export_hf={target}")
    _refused(proc, "train.export_hf", "does not exist")
    assert sorted(os.listdir(tmp_path)) == []  # neither the parents nor the workdir were made


# -- item 9: train.steps against the checkpoint --------------------------------------------------------------


def test_train_steps_below_the_checkpoint_is_refused(base_run):
    workdir, data = base_run
    proc = _train(workdir, *data, "train.steps=1")
    _refused(proc, "train.steps=1", "latest checkpoint", "(2)")
    assert _steps(workdir) == [1, 2] and [r["step"] for r in _metrics(workdir)] == [1, 2]


def test_train_steps_at_the_checkpoint_has_nothing_to_do(base_run):
    workdir, data = base_run
    proc = _train(workdir, *data, "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"train: nothing to do: {workdir} is at step 2 = train.steps"
    assert "loss None" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert _steps(workdir) == [1, 2] and [r["step"] for r in _metrics(workdir)] == [1, 2]


# -- item 16: a failed run's own empty workdir ---------------------------------------------------------------


def test_a_failed_run_removes_the_workdir_it_made_and_keeps_an_existing_one(tmp_path):
    missing = ["data.corpus=null", f"data.dir={tmp_path}/no-data", "train.steps=2"]
    made = tmp_path / "a" / "b" / "run"
    _refused(_train(made, *missing), "data.dir", "does not exist")
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    _refused(_train(existing, *missing), "data.dir", "does not exist")
    assert existing.is_dir()


# -- item 13: bfloat16 parameters train -----------------------------------------------------------------------

BF16_BOUND = 0.02  # |bf16 - f32| / f32 per step, over 6 steps: bf16 parameters round each update to 8 bits


def test_bfloat16_parameters_train_under_both_nonfinite_modes(base_run, tmp_path, monkeypatch):
    data = base_run[1] + ["train.steps=6", "checkpoint.every=100"]
    run_training(CONFIG, str(tmp_path / "f32"), data)
    f32 = [r["loss"] for r in _metrics(str(tmp_path / "f32"))]
    monkeypatch.setenv("NORMISTRAL_FAULTS", "nan_at_step=3")
    run_training(CONFIG, str(tmp_path / "skip"), data + ["model.param_dtype=bfloat16"])
    skip = _metrics(str(tmp_path / "skip"))
    assert [r["skipped_steps"] for r in skip] == [0, 0, 1, 1, 1, 1] and skip[2]["loss"] is None
    monkeypatch.setenv("NORMISTRAL_FAULTS", "nan_at_step=5")
    with pytest.raises(NonFiniteError, match="step 5: non-finite loss"):
        run_training(CONFIG, str(tmp_path / "abort"), data + ["model.param_dtype=bfloat16", "train.nonfinite=abort"])
    abort = [r["loss"] for r in _metrics(str(tmp_path / "abort"))]
    assert len(abort) == 4 and np.all(np.isfinite(abort))
    # Without a NaN step the bf16 run follows the float32 one within the bound, and learns.
    np.testing.assert_allclose(abort, f32[:4], rtol=BF16_BOUND)
    assert abort[-1] < abort[0] and skip[-1]["loss"] < skip[0]["loss"]
    assert abs(skip[0]["loss"] - f32[0]) <= BF16_BOUND * f32[0]


def test_compile_check_of_bfloat16_parameters_for_a_tpu():
    proc = _cli("compile-check", "--config", CONFIG, "--topology", "v5e:2x2", "--mode", "train", "--json",
                "--set", "model.param_dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["param_dtype"] == "bfloat16" and report["fits"] is True and report["alias_bytes"] > 0


# -- item 8: a Llama config.json's sliding_window -------------------------------------------------------------


def test_llama_ignores_sliding_window_as_transformers_does(tmp_path):
    import torch
    import transformers
    from flax import nnx

    from jaxmodel import from_pretrained
    from jaxmodel.config import MistralConfig
    from jaxmodel.parity import make_hf_checkpoint

    path = str(tmp_path / "llama")
    make_hf_checkpoint(path, MistralConfig.tiny(num_hidden_layers=2), seed=3)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    hf.update(model_type="llama", architectures=["LlamaForCausalLM"], sliding_window=8)  # 8 << 64 tokens
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    assert MistralConfig.from_hf(path).sliding_window is None
    ids = np.random.default_rng(0).integers(0, 1024, size=(2, 64))
    ref = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    assert ref.config.sliding_window == 8  # kept as an attribute, not used by the attention
    with torch.no_grad():
        expected = ref.eval()(torch.as_tensor(ids)).logits.numpy()
    logits = nnx.jit(lambda m, x: m(x))(from_pretrained(path, progress=False), ids)
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4


# -- item 14: compile-check refusals and verdicts ---------------------------------------------------------------


def test_compile_check_refuses_cudnn_attention_for_a_tpu():
    proc = _cli("compile-check", "--config", "tiny-tpu-check", "--topology", "v5e:2x2",
                "--set", "model.attention_impl=cudnn")
    _refused(proc, "model.attention_impl=cudnn", "v5e:2x2", "splash")


def test_compile_check_of_a_program_too_large_to_compile_reports_fits_false():
    """libtpu refuses the generation program (RESOURCE_EXHAUSTED, ~10 s): the verdict and the compiler's
    figures, not its traceback. Exit 0: `fits: false` is the check's answer, not a failure to check."""
    proc = _cli("compile-check", "--config", "normistral-11b-long-infer-v6e-1", "--topology", "v6e:1x1", "--mode",
                "decode", "--json", "--set", "inference.batch_size=2", "--set", "inference.max_length=32768",
                "--kv-cache-memory", "12GiB")  # the engine's pool too large as well
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["fits"] is False and report["device_bytes"] > report["hbm_bytes"] == 32 * 1024**3
    assert report["compiler"].startswith("RESOURCE_EXHAUSTED") and report["engine"]["fits"] is False
    engine = report["engine"]  # 12 GiB of pages beside 21.3 GiB of weights: refused before compiling
    assert engine["pool"]["pages"] == 12 * 1024**3 // (16 * 163840) and engine["steps"] == {}
    assert engine["compiler"].startswith("not compiled: the weights (21.") and "exceed the 30.40 GiB allowed" in \
        engine["compiler"]
