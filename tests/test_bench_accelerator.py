"""bench/accelerator.py: the --tiny run fills every column with sane fractions and prints its table last;
bad flags are one-line errors before any work; SIGTERM ends a run like Ctrl-C, leaving no JSON behind; a
spent time budget skips rows and says so; the datasheet lookup matches whole device-kind words.

The tiny run is a real subprocess on this CPU (tiny shapes; PyTorch on the CPU fills the ratio column).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "accelerator.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))


def _start(*args, **kwargs):
    return subprocess.Popen([sys.executable, SCRIPT, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator") / "accel.json"
    proc = _start("--tiny", "--json", str(out))
    stdout, stderr = proc.communicate(timeout=600)
    return proc.returncode, stdout, stderr, out


def test_tiny_run_fills_every_column_with_fractions_in_range(tiny_run):
    rc, stdout, stderr, out = tiny_run
    assert rc == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    result = json.loads(out.read_text())
    assert [f for f in os.listdir(out.parent) if f != out.name] == []  # no temporary left beside it
    assert result["plan"] == "tiny" and result["jax"] and result["device_kind"]
    assert result["ceilings"]["matmul_flops"] > 0 and result["ceilings"]["copy_bytes_per_s"] > 0
    parts = [r["part"] for r in result["rows"]]
    assert parts.count("train") == 1 and parts.count("torch") == 1
    assert parts.count("decode") == 2 and parts.count("prefill") == 2
    for row in result["rows"]:
        assert row["status"] == "ok", row
        for column in result["columns"]:
            assert row[column] not in (None, ""), (column, row)
        assert row["first_call_s"] > 0 and row["layer_ms"] > 0
    for row in result["rows"]:
        if row["part"] == "torch":
            assert row["torch_ratio"] > 0 and row["torch_layer_s"] > 0 and "sdpa" in row["torch"]
            continue
        assert 0 < row["mfu"] <= 1, row
        assert row["mfu_datasheet"] == "n/a"  # a CPU is not in the datasheet table
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0
        if row["part"] == "train":
            assert row["torch_ratio"] > 0 and row["remat"] == "full"  # the shipped recipe's policy
        else:
            assert 0 < row["bw_fraction"] <= 1, row
            assert row["bw_fraction_datasheet"] == "n/a"


def test_tiny_run_prints_the_table_last(tiny_run):
    _, stdout, _, out = tiny_run
    rows = json.loads(out.read_text())["rows"]
    lines = stdout.rstrip("\n").splitlines()
    table = lines[-(len(rows) + 2):]
    assert table[0].startswith("| part | configuration |") and table[1].startswith("|---|")
    assert [line.split(" | ")[1] for line in table[2:]] == [r["config"] for r in rows]
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert lines[-(len(rows) + 4)].startswith("device: ")


@pytest.mark.parametrize("args, culprit", [
    (["--json", "/nonexistent-dir/accel.json"], "--json /nonexistent-dir/accel.json: directory"),
    (["--budget", "0"], "--budget 0: must be a positive"),
    (["--repeats", "0"], "--repeats 0: must be at least 1"),
    (["--quick", "--tiny"], "argument --tiny: not allowed with argument --quick"),
])
def test_bad_flags_are_one_line_errors(args, culprit):
    t = time.monotonic()
    proc = _start(*args)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.strip().splitlines()[-1].startswith(f"normistral: error: {culprit}")
    assert "Traceback" not in stderr and "[accelerator" not in stderr  # refused before any measurement
    assert time.monotonic() - t < 60


def test_sigterm_ends_the_run_without_writing_json(tmp_path):
    out = tmp_path / "accel.json"
    proc = _start("--tiny", "--json", str(out))
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # wait until it measures (the ceilings are done, the train row compiles)
        if "ceilings:" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == "normistral: error: interrupted; no results written"
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


def test_spent_budget_skips_rows_and_says_so(tmp_path):
    out = tmp_path / "accel.json"
    proc = _start("--tiny", "--budget", "0.01", "--json", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6
    assert all(r["status"] == "skipped: time budget (--budget 0.01 s) spent" for r in rows)
    assert stdout.rstrip().splitlines()[-1].endswith("| skipped: time budget (--budget 0.01 s) spent |")


def test_datasheet_matches_whole_device_kind_words():
    from accelerator_parts import datasheet

    assert datasheet("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert datasheet("NVIDIA H100 PCIe") == (756e12, 2.0e12)
    assert datasheet("NVIDIA H200") == (989e12, 4.8e12)
    assert datasheet("TPU v5 lite") == (197e12, 0.82e12)
    assert datasheet("TPU v5") == (459e12, 2.77e12)
    assert datasheet("NVIDIA L4") == (121e12, 0.3e12)
    assert datasheet("NVIDIA L40S") == (None, None)  # not an L4
    assert datasheet("cpu") == (None, None)
