"""SIGTERM is handled like Ctrl-C, and a `gs://` path that cannot be reached fails fast, on one line.

Every test runs the real CLI (`python -m normistral`, so `main()` installs its signal handlers) in a
subprocess and sends a real SIGTERM to that process alone (as `kill PID`, a scheduler or `docker stop`
do) once the command is observably mid-work: a progress bar moved, an output line came out, a unit was
committed. Each then checks the contract: exit status 143, the last stderr line
`normistral: error: terminated (SIGTERM)...`, no traceback, no temporaries left.

The models are written with safetensors/numpy (no PyTorch): 24 layers where import-hf (219 tensors) must
take long enough to be interrupted, 2 where generate should compile quickly.
"""

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from jaxmodel.config import MistralConfig
from tests.random_weights import write_random_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "training", "corpus")


def _write_model(path, layers: int) -> str:
    """A toy Hugging Face directory with a tokenizer trained on the bundled corpus."""
    from training.tokenizer import train_tokenizer

    train_tokenizer([os.path.join(CORPUS, "nb.jsonl")], str(path), vocab_size=512)
    config = MistralConfig.tiny(vocab_size=512, num_hidden_layers=layers, max_position_embeddings=2048)
    return write_random_hf(path, config)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _write_model(tmp_path_factory.mktemp("signals") / "deep", 24)


@pytest.fixture(scope="module")
def shallow_dir(tmp_path_factory):
    return _write_model(tmp_path_factory.mktemp("signals") / "shallow", 2)


def _start(*argv: str, env=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "normistral", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> tuple[bytes, bytes]:
    """Reads the process' output until `ready(stdout, stderr)` holds; (stdout, stderr) so far."""
    stdout, stderr = proc.stdout.fileno(), proc.stderr.fileno()
    out, open_fds = {stdout: b"", stderr: b""}, {stdout, stderr}
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready(out[stdout], out[stderr]):
            return out[stdout], out[stderr]
        if proc.poll() is not None and not open_fds:
            raise AssertionError(f"the command ended before {what}: {out[stderr][-3000:]!r}")
        readable, _, _ = select.select(list(open_fds), [], [], 0.2)
        for fd in readable:
            chunk = os.read(fd, 65536)
            out[fd] += chunk
            if not chunk:
                open_fds.discard(fd)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}: {out[stderr][-3000:]!r}")


def _terminate(proc: subprocess.Popen, seen_err: bytes) -> str:
    """Sends SIGTERM to the process (not its children) and returns its whole stderr once it ended."""
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    return (seen_err + rest).decode("utf-8", "replace")


def _assert_terminated(proc: subprocess.Popen, err: str, line_start: str) -> None:
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().split("\n")[-1].startswith(line_start), repr(err[-2000:])


def _temporaries(directory) -> list[str]:
    return [e for e in os.listdir(directory) if ".tmp-" in e]


def test_sigterm_during_import_hf_is_one_line_exit_143_and_leaves_nothing(model_dir, tmp_path):
    dest = tmp_path / "ckpt"
    proc = _start("import-hf", model_dir, str(dest))
    _, err = _wait_for(proc, lambda out, err: re.search(rb"\b[1-9][0-9]*/219 \[", err), "tensors being written")
    err = _terminate(proc, err)
    _assert_terminated(proc, err, "normistral: error: terminated (SIGTERM); outputs being written were removed")
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # neither the output nor `.ckpt.tmp-*`


def test_sigterm_during_generate_output_is_one_line_exit_143_and_leaves_nothing(shallow_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"Hei nummer {i}"}) + "\n" for i in range(64)))
    out = tmp_path / "out" / "gen.jsonl"
    out.parent.mkdir()
    proc = _start("generate", shallow_dir, "--input", str(prompts), "--output", str(out), "--batch-size", "1",
                  "--max-new-tokens", "64")
    # The first result printed: generating, with the output's temporary sibling open.
    _, err = _wait_for(proc, lambda stdout, _: b"\n" in stdout, "the first generated line")
    assert _temporaries(out.parent), "the output's temporary should exist while generating"
    err = _terminate(proc, err)
    _assert_terminated(proc, err, "normistral: error: terminated (SIGTERM); outputs being written were removed")
    assert os.listdir(out.parent) == []


def test_sigterm_during_prepare_data_is_one_line_exit_143_and_resumable(model_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(os.path.join(CORPUS, "nb.jsonl"), encoding="utf-8") as f:
        corpus.write_text(f.read() * 12, encoding="utf-8")
    out = tmp_path / "data"
    partial = tmp_path / ".data.partial"

    def a_unit_committed(stdout, stderr):
        return partial.is_dir() and any(n.startswith("unit-") and n.endswith(".json") for n in os.listdir(partial))

    args = ["prepare-data", "--tokenizer", model_dir, "--input", str(corpus), "--output", str(out),
            "--seq-len", "64", "--unit-mb", str(20_000 / 2**20), "--workers", "2"]
    proc = _start(*args)
    _, err = _wait_for(proc, a_unit_committed, "a committed unit")
    err = _terminate(proc, err)
    _assert_terminated(proc, err, f"normistral: error: terminated (SIGTERM); rerun the same command to resume ({out})")
    assert not out.exists()
    assert not _temporaries(partial), os.listdir(partial)  # in-flight units removed, committed ones kept
    rerun = _start(*args)
    _, rerun_err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, rerun_err[-3000:]
    assert b"units already done" in rerun_err and not partial.exists()


def test_sigterm_while_serve_loads_the_model_is_one_line_exit_143(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _start("serve", model_dir, "--port", str(port), "--slots", "1", "--max-model-len", "256")
    # uvicorn installs its own SIGTERM handler only once it runs: this is the loading phase before it.
    _, err = _wait_for(proc, lambda out, err: re.search(rb"\b[1-9][0-9]*/[0-9]+ \[", err), "the model loading")
    err = _terminate(proc, err)
    _assert_terminated(proc, err, "normistral: error: terminated (SIGTERM)")


def test_unreachable_gcs_fails_within_seconds_on_one_line_naming_the_path(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No credentials (no gcloud files under this HOME, none in the environment) and gcsfs' defaults.
    unset = ("FSSPEC_GS_TOKEN", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", HOME=str(tmp_path), PYTHONPATH=ROOT,
               JAX_PLATFORMS="cpu")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "normistral", "import-hf", "gs://no-network/model",
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.time() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Unclosed" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().split("\n") == [
        f"normistral: error: gs://no-network/model: cannot connect to Google Cloud Storage at 127.0.0.1:{port} "
        "(connection refused; 3 tries)"], proc.stderr[-3000:]
    assert elapsed < 25, elapsed
    assert not (tmp_path / "out").exists()
