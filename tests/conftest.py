"""Shared test setup: 8 simulated CPU devices, float32 matmuls at full precision, tiny HF checkpoints.

Parity is checked in float32 with `jax_default_matmul_precision="highest"` (on CPU this is the default
arithmetic anyway; on TPU it stops bf16 passes inside float32 matmuls).
"""

import os
import signal

# The tests send SIGINT as a user's Ctrl-C to the commands they start. A suite started in the background by a
# shell without job control inherits SIGINT *ignored*, and an ignored signal stays ignored across exec: the
# commands would never see it. Handled here, it is reset to the default in every child (exec resets handlers).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the [tpu] extra) would otherwise probe for a TPU
# The commands' persistent compilation cache (on by default, in ~/.cache) stays off in tests, in process and in
# the CLI subprocesses that inherit this environment: nothing written to the user's cache, no test depending on
# what an earlier run left there. tests/inference/test_paged_serving.py turns it on, in a temporary directory.
os.environ.setdefault("NORMISTRAL_COMPILE_CACHE", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

from jaxmodel.config import MistralConfig  # noqa: E402
from jaxmodel.parity import make_hf_checkpoint  # noqa: E402

# The parity configurations: each covers a case the acceptance list names.
PARITY_CONFIGS = {
    # NorMistral's shape: 4:1 GQA, head_dim (32) != hidden / heads (128 / 8 = 16), theta 1e6, eps 1e-5.
    "normistral_gqa": MistralConfig.tiny(
        hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=1e6, rms_norm_eps=1e-5
    ),
    # Multi-query attention (one KV head), eps 1e-6, default theta.
    "mqa": MistralConfig.tiny(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6
    ),
    # Tied input/output embeddings.
    "tied": MistralConfig.tiny(tie_word_embeddings=True, num_hidden_layers=3),
    # A sliding window (64) much shorter than the test sequences (>= 512).
    "sliding": MistralConfig.tiny(sliding_window=64, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-6),
}


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> directory of a random transformers checkpoint (float32) for each parity config."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, (name, cfg) in enumerate(PARITY_CONFIGS.items()):
        out[name] = str(root / name)
        make_hf_checkpoint(out[name], cfg, seed=seed)
    return out


@pytest.fixture(scope="session")
def hf_bf16_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_bf16") / "ckpt")
    make_hf_checkpoint(path, PARITY_CONFIGS["normistral_gqa"], seed=7, dtype="bfloat16")
    return path


def pytest_report_header(config):
    return (
        f"jax {jax.__version__}, devices: {len(jax.devices())} x {jax.devices()[0].platform}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"
    )


# -- Google Cloud Storage on localhost -------------------------------------------------------------------
# The real GCS JSON API, served by the `gcp-storage-emulator` package (a test dependency in setup.py):
# gcsfs/fsspec and the Python clients reach it through STORAGE_EMULATOR_HOST, TensorStore (and so Orbax's
# arrays) through TENSORSTORE_GCS_HTTP_URL. The variables are set in os.environ, so CLI subprocesses that
# inherit the environment see the same buckets.
GCS_ENV_KEYS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "FSSPEC_GS_TOKEN",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


@pytest.fixture(scope="session")
def gcs_emulator():
    """The emulator's base URL; started once per session on a free port, stopped at the end."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The installed emulator plus the generation headers real GCS sends (tests/gcs_emulator.py says why).
    exe = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")]
    # Its stderr goes to a file: a pipe nobody reads would block the server once full.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([*exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log.seek(0)
                raise RuntimeError(f"the GCS emulator did not start: {log.read().decode()[-2000:]}") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in GCS_ENV_KEYS}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
                      FSSPEC_GS_TOKEN="anon",
                      # gcsfs' experimental file system probes bucket types over gRPC (60 s per bucket against
                      # an HTTP-only emulator); the classic JSON-API client is what talks to the emulator.
                      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """A new, empty bucket for one test: its URL, e.g. gs://test-1a2b3c4d."""
    import uuid

    import fsspec

    name = f"test-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("gs", skip_instance_cache=True).mkdir(name)
    return f"gs://{name}"


@pytest.fixture(scope="module")
def offline():
    """No network for a module's tests: hub ids and datasets come from the caches only."""
    from tests.hub_cache import offline_hub

    with offline_hub():
        yield


@pytest.fixture(scope="module")
def repo_cwd():
    """Runs a test module from the repository root (lm-eval task YAMLs name their data files from there)."""
    previous = os.getcwd()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    yield
    os.chdir(previous)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, JAX's caches of compiled programs are cleared (`jax.clear_caches`): one pytest
    process of the whole suite compiles thousands of XLA programs, and with every executable kept the
    process crashed in a later module's compile (an abort, then a segfault, at different tests; each passes
    alone), the likely cause being the executables' accumulated memory mappings (vm.max_map_count 65530)."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
