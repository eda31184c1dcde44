"""`normistral generate` with the model, the prompts and the output on gs:// (the GCS emulator): the same
results as from local files; a killed run leaves no output object; bad gs:// paths are one-line errors."""

import json
import os
import signal
import subprocess
import sys

import pytest

import normistral
from jaxmodel import storage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [{"text": "I like cheese.", "id": 1}, {"text": "Where is the train station?", "id": 2},
           {"text": "The weather is nice.", "id": 3}]


@pytest.fixture
def gcs_model(tiny_dir, gcs_bucket):
    with storage.atomic_directory(f"{gcs_bucket}/model") as out:
        storage.upload_dir(tiny_dir, out)
    storage.write_text(f"{gcs_bucket}/in.jsonl", "".join(json.dumps(x) + "\n" for x in PROMPTS))
    return gcs_bucket


def _args(model, prompts, out):
    return ["generate", model, "--input", prompts, "--max-new-tokens", "6", "--batch-size", "2", "--output", out,
            "--dtype", "float32"]


def test_generate_reads_and_writes_gcs(tiny_dir, gcs_model, tmp_path, capsys):
    bkt = gcs_model
    local_in = tmp_path / "in.jsonl"
    local_in.write_text(storage.read_text(f"{bkt}/in.jsonl"), encoding="utf-8")
    normistral.main(_args(tiny_dir, str(local_in), str(tmp_path / "out.jsonl")))
    normistral.main(_args(f"{bkt}/model", f"{bkt}/in.jsonl", f"{bkt}/out.jsonl"))
    capsys.readouterr()
    remote = [json.loads(x) for x in storage.read_text(f"{bkt}/out.jsonl").splitlines()]
    local = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in remote] == [1, 2, 3] and remote == local


def test_killed_generate_leaves_no_output(gcs_model):
    bkt = gcs_model
    storage.write_text(f"{bkt}/many.jsonl", "".join(json.dumps({"text": f"Hei {i}"}) + "\n" for i in range(200)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "normistral", *_args(f"{bkt}/model", f"{bkt}/many.jsonl", f"{bkt}/out.jsonl")]
    proc = subprocess.Popen(cmd[:-2] + ["--batch-size", "1"] + cmd[-2:], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()  # one result printed: the run is under way
        assert first.startswith("{"), first
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not storage.exists(f"{bkt}/out.jsonl")
    assert not [n for n in storage.listdir(bkt) if n.startswith("out")]


@pytest.mark.parametrize("case", ["missing_model", "missing_bucket", "uncommitted_model", "missing_input",
                                  "output_bucket"])
def test_bad_gcs_paths_exit_2_with_one_line(gcs_model, capsys, case):
    bkt = gcs_model
    model, prompts, out = f"{bkt}/model", f"{bkt}/in.jsonl", f"{bkt}/out.jsonl"
    if case == "missing_model":
        model, needle = f"{bkt}/nothing", f"{bkt}/nothing: no such file or directory"
    elif case == "missing_bucket":
        model, needle = "gs://no-such-bucket-i11/model", "bucket gs://no-such-bucket-i11 does not exist"
    elif case == "uncommitted_model":
        storage.remove(f"{model}/{storage.COMMITTED}")  # as a killed upload leaves it: _WRITING only
        needle = f"{model}: uncommitted model directory"
    elif case == "missing_input":
        prompts, needle = f"{bkt}/none.jsonl", f"{bkt}/none.jsonl: no such file or directory"
    else:
        out, needle = "gs://no-such-bucket-i11/out.jsonl", "bucket gs://no-such-bucket-i11 does not exist"
    with pytest.raises(SystemExit) as exit_info:
        normistral.main(_args(model, prompts, out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("normistral: error:") and needle in err[0], err
    assert not storage.exists(f"{bkt}/out.jsonl")
