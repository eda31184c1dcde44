"""The training run end to end on the tiny config (configs/tiny-cpu.yaml), 8 simulated CPU devices:
it learns, resumes bit-exactly after SIGKILL (also mid-save), resumes onto another mesh, saves and exits 0
on SIGTERM, skips or aborts on a NaN batch, and its train step compiles for a TPU topology.

The runs that must be killed go through the real CLI in subprocesses (`normistral train ...`); the
others call `run_training` in this process to save start-up time."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from training.train import NonFiniteError, run_training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny-cpu.yaml")


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _finalized(workdir):
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """100 steps of the tiny config from scratch, building tokenizer and data from the bundled corpus."""
    workdir = str(tmp_path_factory.mktemp("tiny") / "run")
    t0 = time.perf_counter()
    summary = run_training(CONFIG, workdir, ["train.steps=100", "train.eval_every=50", "train.export_hf=hf"])
    return workdir, summary, time.perf_counter() - t0


def _data_overrides(tiny_run):
    workdir = tiny_run[0]
    return [f"data.dir={workdir}/data", f"data.eval_dir={workdir}/data-heldout", "train.eval_every=0"]


def _cli(workdir, overrides, faults=None, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    env.pop("NORMISTRAL_FAULTS", None)
    if faults:
        env["NORMISTRAL_FAULTS"] = faults
    args = [sys.executable, "-m", "normistral", "train", "--config", CONFIG, "--workdir", workdir]
    for item in overrides:
        args += ["--set", item]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def test_tiny_config_learns_from_the_bundled_corpus(tiny_run):
    workdir, summary, _ = tiny_run
    for name in ("tokenizer", "data", "data-heldout"):
        assert os.path.isdir(os.path.join(workdir, name)), name
    lines = _metrics(workdir)
    assert [r["step"] for r in lines] == list(range(1, 101))
    assert all(isinstance(r["loss"], float) for r in lines)
    first = np.mean([r["loss"] for r in lines[:10]])
    last = np.mean([r["loss"] for r in lines[-10:]])
    assert first > 6.0 and last < first - 2.0, (first, last)
    evals = [r["eval_loss"] for r in lines if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert summary["step"] == 100 and _finalized(workdir)[-1] == 100
    events = [f for f in os.listdir(os.path.join(workdir, "tensorboard")) if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(os.path.join(workdir, "tensorboard", events[0])) > 1000  # 100 steps of scalars

    # train.export_hf: the final weights as a Hugging Face directory transformers loads.
    import torch
    import transformers

    hf = transformers.MistralForCausalLM.from_pretrained(os.path.join(workdir, "hf"), dtype=torch.float32)
    final = _params(workdir, 100)
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), np.asarray(final["lm_head"]).T)
    np.testing.assert_array_equal(hf.model.layers[1].mlp.down_proj.weight.detach().numpy(),
                                  np.asarray(final["layers"]["mlp"]["down_proj"][1]).T)


_RESUME_RUN = ["train.steps=12", "checkpoint.every=4", "checkpoint.keep=10"]


@pytest.fixture(scope="module")
def straight12(tiny_run, tmp_path_factory):
    """The uninterrupted 12-step reference run (checkpoints at 4, 8, 12), shared by the resume tests."""
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    code, log = _finish(_cli(workdir, _data_overrides(tiny_run) + _RESUME_RUN))
    assert code == 0, log
    return workdir


def test_killed_runs_resume_bit_exactly(tiny_run, straight12, tmp_path):
    common = _data_overrides(tiny_run) + _RESUME_RUN
    broken = str(tmp_path / "broken")

    # 1: SIGKILL right after the step-8 save started: the step-8 checkpoint is not finalized.
    code, log = _finish(_cli(broken, common, faults="kill_after_save=8"))
    assert code == -signal.SIGKILL, log
    assert _finalized(broken) == [4], os.listdir(os.path.join(broken, "checkpoints"))
    # 2: restarted, resumes from 4; SIGKILL at step 10 (after the step-8 checkpoint completed).
    code, log = _finish(_cli(broken, common, faults="kill_at_step=10"))
    assert code == -signal.SIGKILL and "resuming from checkpoint step 4" in log, log
    # 3: restarted again, resumes from 8 and finishes.
    code, log = _finish(_cli(broken, common))
    assert code == 0 and "resuming from checkpoint step 8" in log, log

    ours, theirs = _metrics(broken), _metrics(straight12)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 13))
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]  # bit-identical floats
    assert [r["grad_norm"] for r in ours] == [r["grad_norm"] for r in theirs]


def test_resume_onto_another_mesh_shape(tiny_run, straight12, tmp_path):
    workdir = str(tmp_path / "remesh")
    shutil.copytree(straight12, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))  # resume from step 8 (saved on fsdp=8)
    overrides = _data_overrides(tiny_run) + _RESUME_RUN + ["mesh.fsdp=4", "mesh.tensor=2"]
    code, log = _finish(_cli(workdir, overrides))
    assert code == 0 and "resuming from checkpoint step 8" in log and "'fsdp': 4, 'tensor': 2" in log, log
    ours, theirs = _metrics(workdir), _metrics(straight12)
    assert [r["step"] for r in ours] == list(range(1, 13))
    np.testing.assert_allclose([r["loss"] for r in ours[8:]], [r["loss"] for r in theirs[8:]], rtol=1e-5)


def test_sigterm_saves_at_the_next_step_and_exits_zero(tiny_run, tmp_path):
    workdir = str(tmp_path / "preempted")
    proc = _cli(workdir, _data_overrides(tiny_run) + ["train.steps=100000", "checkpoint.every=100000"])
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
            break
        time.sleep(0.2)
    signalled_after = len(_metrics(workdir))
    proc.send_signal(signal.SIGTERM)
    code, log = _finish(proc)
    assert code == 0, log
    last = _metrics(workdir)[-1]["step"]
    assert signalled_after <= last <= signalled_after + 2  # the step running when the signal came, or the next
    assert _finalized(workdir) == [last]
    assert f"saved checkpoint at step {last}" in log


def _params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "params")
    return ocp.StandardCheckpointer().restore(path)


def test_nan_batch_is_skipped_with_parameters_unchanged(tiny_run, tmp_path, monkeypatch):
    workdir = str(tmp_path / "skip")
    monkeypatch.setenv("NORMISTRAL_FAULTS", "nan_at_step=3")
    run_training(CONFIG, workdir, _data_overrides(tiny_run) + ["train.steps=4", "checkpoint.every=1",
                                                               "checkpoint.keep=10"])
    lines = _metrics(workdir)
    assert [r["skipped_steps"] for r in lines] == [0, 0, 1, 1]
    assert lines[2]["loss"] is None and np.isfinite(lines[3]["loss"])  # strict JSON: null, not NaN
    import jax

    before, skipped, after = (jax.tree.leaves(_params(workdir, s)) for s in (2, 3, 4))
    for a, b in zip(before, skipped):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(skipped, after))


def test_nan_batch_aborts_under_abort(tiny_run, tmp_path, monkeypatch):
    workdir = str(tmp_path / "abort")
    monkeypatch.setenv("NORMISTRAL_FAULTS", "nan_at_step=3")
    overrides = _data_overrides(tiny_run) + ["train.steps=4", "checkpoint.every=1", "train.nonfinite=abort"]
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss .*aborting.*last checkpoint is step 2"):
        run_training(CONFIG, workdir, overrides)
    assert _finalized(workdir) == [1, 2]
    assert [r["step"] for r in _metrics(workdir)] == [1, 2]


def test_compile_check_train_for_a_tpu_topology():
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)  # the CLI sets it for compile-check
    out = subprocess.run([sys.executable, "-m", "normistral", "compile-check", "--config", CONFIG,
                          "--topology", "v5e:2x2", "--mode", "train", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["mode"] == "train" and report["devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["global_batch_size"] == 8 and report["seq_len"] == 128
    assert report["fits"] and 0 < report["device_bytes"] < report["hbm_bytes"]
    assert report["alias_bytes"] > 0  # the donated state is updated in place


def test_export_hf_reads_a_training_checkpoint_step(tiny_run, tmp_path):
    """`normistral export-hf WORKDIR/checkpoints/STEP HF_DIR`: the config comes from the checkpoint's meta."""
    import torch
    import transformers

    from jaxmodel import export_hf

    workdir = tiny_run[0]
    out = str(tmp_path / "hf")
    export_hf(os.path.join(workdir, "checkpoints", "100"), out, progress=False)
    hf = transformers.MistralForCausalLM.from_pretrained(out, dtype=torch.float32)
    final = _params(workdir, 100)
    np.testing.assert_array_equal(hf.model.layers[0].self_attn.q_proj.weight.detach().numpy(),
                                  np.asarray(final["layers"]["self_attn"]["q_proj"][0]).reshape(128, -1).T)


# -- the same runs with the workdir and the data on gs:// (the GCS emulator on localhost) -------------------


def _gcs_metrics(workdir):
    from jaxmodel import storage

    return [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]


def _gcs_finalized(workdir):
    """Steps whose Orbax commit marker (commit_success.txt, written last on object stores) exists."""
    from jaxmodel import storage

    root = f"{workdir}/checkpoints"
    return sorted(int(d) for d in storage.listdir(root) if d.isdigit()
                  and storage.exists(f"{root}/{d}/commit_success.txt"))


def test_gcs_workdir_and_data_killed_runs_resume_bit_exactly(tiny_run, straight12, gcs_bucket):
    """Data uploaded into a committed directory on gs://, `--workdir gs://...`: SIGKILL mid-save and between
    steps, rerun: per-step losses bit-identical to the uninterrupted (local) run."""
    from jaxmodel import storage

    for name in ("data", "data-heldout"):
        with storage.atomic_directory(f"{gcs_bucket}/{name}") as out:
            storage.upload_dir(os.path.join(tiny_run[0], name), out)
    run = f"{gcs_bucket}/run"
    common = [f"data.dir={gcs_bucket}/data", f"data.eval_dir={gcs_bucket}/data-heldout", "train.eval_every=0",
              *_RESUME_RUN]
    code, log = _finish(_cli(run, common, faults="kill_after_save=8"), timeout=900)
    assert code == -signal.SIGKILL, log
    assert _gcs_finalized(run) == [4], storage.listdir(f"{run}/checkpoints")
    code, log = _finish(_cli(run, common, faults="kill_at_step=10"), timeout=900)
    assert code == -signal.SIGKILL and "resuming from checkpoint step 4" in log, log
    code, log = _finish(_cli(run, common), timeout=900)
    assert code == 0 and "resuming from checkpoint step 8" in log, log
    assert not os.path.exists(os.path.join(ROOT, "gs:")), "a gs:// URL was taken for a local path"

    ours, theirs = _gcs_metrics(run), _metrics(straight12)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 13))
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]  # bit-identical floats
    assert [r["grad_norm"] for r in ours] == [r["grad_norm"] for r in theirs]
    assert _gcs_finalized(run) == [4, 8, 12]


def test_gcs_workdir_builds_data_logs_and_exports(gcs_bucket, tmp_path):
    """A fresh gs:// workdir: tokenizer and packed data built on local scratch and committed on gs://,
    metrics.jsonl and TensorBoard events uploaded, the final export a committed HF directory there."""
    import torch
    import transformers

    from jaxmodel import storage

    run = f"{gcs_bucket}/fresh"
    summary = run_training(CONFIG, run, ["train.steps=3", "train.eval_every=3", "train.export_hf=hf",
                                         "checkpoint.every=3"])
    assert summary["step"] == 3
    for name in ("tokenizer", "data", "data-heldout", "hf"):
        assert storage.is_committed(f"{run}/{name}") and storage.exists(f"{run}/{name}/{storage.COMMITTED}"), name
    assert [r["step"] for r in _gcs_metrics(run)] == [1, 2, 3] and "eval_loss" in _gcs_metrics(run)[-1]
    events = [n for n in storage.listdir(f"{run}/tensorboard") if n.startswith("events.out.tfevents")]
    assert events and storage.size(f"{run}/tensorboard/{events[0]}") > 100
    local = str(tmp_path / "hf")
    storage.copy_dir(f"{run}/hf", local)
    hf = transformers.MistralForCausalLM.from_pretrained(local, dtype=torch.float32)
    final = ocp.StandardCheckpointer().restore(f"{run}/checkpoints/3/params")
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), np.asarray(final["lm_head"]).T)


@pytest.mark.parametrize("case", ["missing_bucket", "uncommitted_data", "missing_data"])
def test_gcs_train_path_errors_are_one_line(gcs_bucket, capsys, case):
    import normistral
    from jaxmodel import storage

    workdir, overrides = f"{gcs_bucket}/run", ["data.corpus=null"]
    if case == "missing_bucket":
        workdir, needle = "gs://no-such-bucket-i11/run", "gs://no-such-bucket-i11/run: bucket gs://no-such-bucket-i11"
    elif case == "uncommitted_data":
        storage.write_text(f"{gcs_bucket}/half/{storage.WRITING}", "")  # an upload that was interrupted
        storage.write_text(f"{gcs_bucket}/half/index.json", "{}")
        overrides.append(f"data.dir={gcs_bucket}/half")
        needle = f"{gcs_bucket}/half: uncommitted data directory"
    else:
        overrides.append(f"data.dir={gcs_bucket}/none")
        needle = f"data.dir {gcs_bucket}/none does not exist"
    args = ["train", "--config", CONFIG, "--workdir", workdir]
    for item in overrides:
        args += ["--set", item]
    with pytest.raises(SystemExit) as exit_info:
        normistral.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normistral: error:") and needle in err[0], err
def test_resume_from_a_truncated_checkpoint_is_one_line(tiny_run, tmp_path, capfd):
    """A checkpoint whose array files were truncated (a full disk, a bad copy): one line naming the step
    directory and what to do, not TensorStore's traceback."""
    import normistral

    last = _finalized(tiny_run[0])[-1]
    workdir = str(tmp_path / "run")
    step_dir = os.path.join(workdir, "checkpoints", str(last))
    shutil.copytree(os.path.join(tiny_run[0], "checkpoints", str(last)), step_dir)
    chunks = os.path.join(step_dir, "params", "ocdbt.process_0", "d")
    for name in os.listdir(chunks):
        os.truncate(os.path.join(chunks, name), 50)
    argv = ["train", "--config", CONFIG, "--workdir", workdir]
    for item in _data_overrides(tiny_run) + [f"train.steps={last + 1}"]:
        argv += ["--set", item]
    with pytest.raises(SystemExit) as info:
        normistral.main(argv)
    err = capfd.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err[-3000:]
    line = err.strip().split("\n")[-1]
    assert line.startswith(f"normistral: error: {step_dir}: cannot restore this checkpoint"), err[-2000:]
    assert "move the step directory away" in line


def test_ctrl_c_while_compiling_is_one_line_exit_130(tiny_run, tmp_path):
    """SIGINT as a user's Ctrl-C, sent once the run has started compiling its step: one line, status 130,
    no traceback, no crash at exit (an interrupted compile used to end in a segfault, status -11), and the
    run stops (an interrupt that landed in JAX's garbage-collector callback used to be swallowed)."""
    proc = _cli(str(tmp_path / "run"), _data_overrides(tiny_run) + ["train.steps=1000"])
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "parameters on mesh" in line:  # logged right before the first step compiles
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    status, output = _finish(proc)
    output = "".join(seen) + output
    assert status == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert output.strip().split("\n")[-1].startswith("normistral: error: interrupted (Ctrl-C)"), output[-2000:]
