"""Every `normistral compile-check` command the README, the docs and the shipped configs' headers show works
offline on this CPU machine: exit 0, a JSON report, no traceback, and for training the data placeholders
(gs://BUCKET/...) and the local placeholder paths (/data/...) reported as not checked instead of contacted
(`--check-data` refuses them, in one line).

Cost: as written, these commands compile the 11B model for their topologies; the v5p:4x4x4 training one
alone takes ~85 s of CPU here, a decode one several minutes. So each runs with `--set` overrides that
shrink the model (1 layer, hidden 512, MLP 1024, vocabulary 4096) and the sequence, keeping the command's
topology, mesh, attention kernel, remat, quantization, cache dtype, batch and the data / init_from
placeholder paths: what can break offline (parsing, the sections, the data check, the topology, the
kernels' compile) is exercised, the full model's fit figures are not (BENCHMARKS.md records those).
Shrunk, a command compiles in 15-30 s here (unloaded); a command whose (mode, topology, quantize,
kv_cache_dtype) another one already compiles is only read (its config, flags and topology), not compiled."""

import glob
import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))),
             *sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))]
SHRINK = ["model.num_hidden_layers=1", "model.hidden_size=512", "model.intermediate_size=1024",
          "model.vocab_size=4096"]
SHRINK_MODE = {"train": ["train.seq_len=2048", "train.loss_chunk=1024"], "decode": ["inference.max_length=1024"],
               "prefill": ["inference.max_length=1024"]}


def documented_commands() -> dict:
    """{argument tuple (without --json): where it is shown}, from every line that shows the command."""
    found = {}
    for path in DOCUMENTS:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                text = line.strip().lstrip("#").strip()
                if not text.startswith("normistral compile-check "):
                    continue
                args = shlex.split(text)[2:]
                if "C" in args:  # the synopsis: `--config C --topology T [...]`
                    continue
                key = tuple(a for a in args if a != "--json")
                found.setdefault(key, f"{os.path.relpath(path, REPO)}:{number}")
    return found


COMMANDS = documented_commands()


def _signature(args) -> tuple:
    """What a compile exercises: the mode, the topology and the inference section's quantization."""
    from jaxmodel.run_config import find_config, load_run_config

    inference = load_run_config(find_config(args[args.index("--config") + 1]), []).get("inference") or {}
    return _mode(args), args[args.index("--topology") + 1], inference.get("quantize"), inference.get("kv_cache_dtype")


def compiled_commands() -> list:
    """One command per signature, the README's first (they are read first)."""
    seen, out = set(), []
    for args in COMMANDS:
        if _signature(args) not in seen:
            seen.add(_signature(args))
            out.append(args)
    return out


def _run(args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # the CLI sets it
    return subprocess.run([sys.executable, "-m", "normistral", "compile-check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _mode(args) -> str:
    return args[args.index("--mode") + 1] if "--mode" in args else "prefill"


def test_the_documents_show_the_commands_this_file_runs():
    assert len(COMMANDS) >= 5, COMMANDS  # the README's two, and the shipped inference configs' own
    shown = {os.path.basename(a[a.index("--config") + 1]).removesuffix(".yaml") for a in COMMANDS}
    assert {"normistral-11b-long-32k-v5p", "normistral-11b-long-infer-v5e-1-int8"} <= shown


@pytest.mark.parametrize("args", list(COMMANDS), ids=[COMMANDS[a] for a in COMMANDS])
def test_documented_command_reads_its_config_offline(args):
    """What the command does before compiling: its flags, every section of its config, the topology and
    the attention kernel (in this process: no network, no libtpu)."""
    from jaxmodel import aot
    from jaxmodel.run_config import load_run_config
    from normistral import _check_sections, build_parser

    parsed = build_parser().parse_args(["compile-check", *args])
    tree = load_run_config(parsed.config, parsed.set)
    _check_sections(tree)
    aot.check_topology(parsed.topology)
    aot.check_attention(tree, parsed.topology)


@pytest.mark.parametrize("args", compiled_commands(), ids=[COMMANDS[a] for a in compiled_commands()])
def test_documented_compile_check_runs_offline(args):
    mode = _mode(args)
    overrides = [x for item in SHRINK + SHRINK_MODE[mode] for x in ("--set", item)]
    proc = _run([*args, "--json", *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mode"] == mode and isinstance(report["fits"], bool) and report["device_bytes"] > 0
    if mode == "train":  # each configured directory named as not checked, for its own reason, offline
        from jaxmodel.run_config import find_config, load_run_config

        data = load_run_config(find_config(args[args.index("--config") + 1]), []).get("data") or {}
        for role in ("dir", "eval_dir"):
            path = data.get(role)
            if path is None or (role == "eval_dir" and not path.startswith("gs://")):
                continue  # train runs without a missing local held-out set: nothing to report
            reason = "is a placeholder, not a bucket name" if path.startswith("gs://BUCKET/") else "does not exist"
            assert f"not checked (data.{role} {path}" in report["data"] and reason in report["data"], report["data"]


def test_check_data_refuses_a_placeholder_before_compiling():
    proc = _run(["--config", "configs/normistral-11b-long-32k-v5p.yaml", "--topology", "v5p:4x4x4",
                 "--mode", "train", "--check-data"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("normistral: error: ") and "Traceback" not in proc.stderr
    assert "data.dir gs://BUCKET/normistral-packed-32k" in last and "placeholder" in last and "--check-data" in last


def test_check_data_refuses_missing_local_data(tmp_path):
    """Without --check-data, data that does not exist yet is reported; with it, refused (the cheap half:
    the refusal comes before compiling)."""
    proc = _run(["--config", "configs/tiny-cpu.yaml", "--topology", "v5e:2x2", "--mode", "train", "--workdir",
                 str(tmp_path), "--set", "data.corpus=null", "--check-data"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("normistral: error: ") and f"data.dir {tmp_path}/data does not exist" in last
    assert not os.listdir(tmp_path) and "Traceback" not in proc.stderr
