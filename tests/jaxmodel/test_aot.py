"""`normistral compile-check`: real TPU executables compiled by libtpu on this CPU machine."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny-tpu-check.yaml")


def _check(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "normistral", "compile-check", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)


def test_tiny_config_compiles_for_a_v5e_slice_and_fits():
    result = _check("--config", TINY, "--topology", "v5e:2x2", "--mode", "prefill", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["hbm_bytes"] == 16 * 1024**3
    assert report["device_bytes"] == (report["argument_bytes"] + report["temp_bytes"] + report["output_bytes"]
                                      - report["alias_bytes"])
    assert report["fits"] is True and 0 < report["device_bytes"] < report["hbm_bytes"]
    # FSDP over 4 chips: each holds a quarter of the (bf16-cast? no: float32) parameters, plus the batch.
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}


def test_11b_width_with_dense_attention_does_not_fit_one_v5e_chip():
    """Two layers of the real width, batch 8 x 4096, `xla` attention: the [B, N, T, S] float32 scores
    alone are 17 GB, more than the chip's 16 GB; the compiler's figure must say so."""
    result = _check("--config", TINY, "--topology", "v5e:1x1", "--json", "--set", "model.preset=normistral_11b_long",
                    "--set", "model.num_hidden_layers=2", "--set", "inference.max_length=4096")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fits"] is False and report["device_bytes"] > 16 * 1024**3


@pytest.mark.parametrize("args, needle", [
    (["--topology", "v9x:2x2"], "topology 'v9x:2x2'"),
    (["--topology", "v5e:banana"], "expected v5e:AxB"),
    (["--topology", "v5e:2x2", "--set", "mesh.tensor=3"], "mesh"),
    (["--topology", "v5e:2x2", "--set", "model.attention_impl=magic"], "attention_impl"),
])
def test_bad_inputs_are_one_line_errors(args, needle):
    result = _check("--config", TINY, *args)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("normistral: error:") and needle in last, result.stderr[-1000:]


def test_missing_config_file_is_an_error():
    result = _check("--config", "no/such.yaml", "--topology", "v5e:2x2")
    assert result.returncode == 2 and "config file not found" in result.stderr
