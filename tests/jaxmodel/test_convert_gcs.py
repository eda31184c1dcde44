"""Model directories on gs:// (the GCS emulator on localhost): import-hf / export-hf through the real CLI,
local -> gs:// -> local and gs:// -> gs://, bit-exact against the source checkpoint; uncommitted and
missing directories refused by name."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxmodel import export_hf, from_pretrained, import_hf, storage

from .test_convert import _assert_bit_exact

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "normistral", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_import_to_gcs_then_export_to_local_is_bit_exact(hf_bf16_checkpoint, gcs_bucket, tmp_path):
    ckpt, back = f"{gcs_bucket}/ckpt", str(tmp_path / "back")
    out = _cli("import-hf", hf_bf16_checkpoint, ckpt)
    assert out.returncode == 0, out.stderr
    names = storage.listdir(ckpt)
    assert {"config.json", "params", storage.WRITING, storage.COMMITTED} <= set(names), names
    assert storage.exists(f"{ckpt}/params/commit_success.txt")  # Orbax's own marker inside
    assert not os.path.exists(os.path.join(ROOT, "gs:")), "a gs:// URL was taken for a local path"
    out = _cli("export-hf", ckpt, back)
    assert out.returncode == 0, out.stderr
    _assert_bit_exact(hf_bf16_checkpoint, back)


def test_gcs_to_gcs_round_trip_is_bit_exact(hf_bf16_checkpoint, gcs_bucket, tmp_path):
    ckpt, hf, ckpt2 = f"{gcs_bucket}/a/ckpt", f"{gcs_bucket}/b/hf", f"{gcs_bucket}/c/ckpt"
    import_hf(hf_bf16_checkpoint, ckpt, progress=False)
    export_hf(ckpt, hf, progress=False)  # gs:// -> gs://: safetensors streamed into the bucket
    assert storage.is_committed(hf) and storage.exists(f"{hf}/model.safetensors")
    import_hf(hf, ckpt2, progress=False)  # safetensors read from the bucket with range reads
    back = str(tmp_path / "back")
    export_hf(ckpt2, back, progress=False)
    _assert_bit_exact(hf_bf16_checkpoint, back)
    # from_pretrained reads a Hugging Face directory on gs:// as well.
    a, b = from_pretrained(hf, progress=False), from_pretrained(hf_bf16_checkpoint, progress=False)
    np.testing.assert_array_equal(np.asarray(a.lm_head[...]), np.asarray(b.lm_head[...]))


def _one_line_error(out, needle):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normistral: error:") and needle in lines[0], out.stderr


@pytest.mark.parametrize("case", ["missing_path", "missing_bucket", "uncommitted"])
def test_bad_gcs_inputs_are_one_line_errors(hf_bf16_checkpoint, gcs_bucket, tmp_path, case):
    src = {"missing_path": f"{gcs_bucket}/nothing-here", "missing_bucket": "gs://no-such-bucket-i11/ckpt",
           "uncommitted": f"{gcs_bucket}/half"}[case]
    if case == "uncommitted":  # what a killed import leaves: the _WRITING marker and part of the files
        storage.write_text(f"{src}/{storage.WRITING}", "")
        storage.copy_file(os.path.join(hf_bf16_checkpoint, "config.json"), f"{src}/config.json")
    needle = {"missing_path": f"{src}: no such file or directory",
              "missing_bucket": "bucket gs://no-such-bucket-i11 does not exist",
              "uncommitted": f"{src}: uncommitted"}[case]
    _one_line_error(_cli("export-hf", src, str(tmp_path / "out")), needle)
    assert not os.path.exists(tmp_path / "out")
    if case == "missing_bucket":  # an output in a bucket that does not exist: refused before any work
        _one_line_error(_cli("import-hf", hf_bf16_checkpoint, "gs://no-such-bucket-i11/ckpt"),
                        "bucket gs://no-such-bucket-i11 does not exist")
