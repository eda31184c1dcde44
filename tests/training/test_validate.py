"""Validation before compiling: each mistake stops `normistral train` and `normistral compile-check --mode
train` with one line naming the numbers and the fix, before the step is compiled, with no checkpoint and
no metrics written (training/validate.py, jaxmodel/sharding.py's check_divisible)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxmodel.model import abstract_model
from jaxmodel.sharding import ShardingError, check_divisible, make_mesh
from training.validate import ValidationError, check_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_CONFIG = os.path.join(REPO, "configs", "tiny-cpu.yaml")
TPU_CONFIG = os.path.join(REPO, "configs", "tiny-tpu-check.yaml")
CORPUS = os.path.join(REPO, "training", "corpus")
SOURCES = [os.path.join(CORPUS, n) for n in ("se.jsonl", "en.jsonl")]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir):
    """Prepared directories: the model's 1024-token tokenizer at 128 and at 64 tokens per row, the
    2048-token tokenizer at 128 (a larger vocabulary than the model's), and a copy of the first with one
    token id past the vocabulary (an index without max_token_id, as data from an older prepare-data)."""
    from training.prepare import prepare_data
    from training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("validate")
    tok1024 = str(root / "tok1024")
    train_tokenizer([os.path.join(CORPUS, "nb.jsonl")] + SOURCES, tok1024, vocab_size=1024)
    out = {"tok1024": tok1024, "tok2048": tokenizer_dir}
    for name, tok, seq in (("d128", tok1024, 128), ("d64", tok1024, 64), ("big_vocab", tokenizer_dir, 128)):
        out[name] = str(root / name)
        prepare_data(tok, SOURCES, out[name], seq, workers=1, progress=False)
    out["bad_id"] = str(root / "bad_id")
    shutil.copytree(out["d128"], out["bad_id"])
    index_path = os.path.join(out["bad_id"], "index.json")
    with open(index_path) as f:
        index = json.load(f)
    del index["max_token_id"]
    with open(index_path, "w") as f:
        json.dump(index, f)
    shard = os.path.join(out["bad_id"], index["shards"][0]["tokens"])
    tokens = np.load(shard)
    tokens[1, 5] = 1500
    np.save(shard, tokens)
    # A tokenizer whose pad token is another one than the data was prepared with.
    out["other_pad_tok"] = str(root / "other_pad_tok")
    shutil.copytree(tok1024, out["other_pad_tok"])
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg_path = os.path.join(out["other_pad_tok"], name)
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["pad_token"] = "<mask>"
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
    return out


def _data_sets(data, name, tokenizer="tok1024"):
    return [f"data.dir={data[name]}", f"data.tokenizer_dir={data[tokenizer]}", "data.corpus=null",
            "train.eval_every=0", "train.steps=2"]


# Each case: (overrides, what the one-line message must contain).
def _cases(data):
    return {
        "batch": (["train.global_batch_size=12"] + _data_sets(data, "d128"),
                  ["train.global_batch_size=12", "fsdp=8", "multiple of 8"]),
        "microbatches": (["train.global_batch_size=16", "train.microbatches=4"] + _data_sets(data, "d128"),
                         ["(16 / 4)=4", "fsdp=8", "multiple of 8"]),
        "weight_dim": (["model.intermediate_size=340", "mesh.fsdp=1", "mesh.tensor=8"] + _data_sets(data, "d128"),
                       ["mlp", "340", "tensor=8", "divides 340"]),
        "seq_len": (_data_sets(data, "d64"), ["packed at seq_len 64", "train.seq_len=128", "train.seq_len=64"]),
        "vocabulary": (_data_sets(data, "big_vocab", "tok2048"),
                       ["2048-token vocabulary", "vocab_size is 1024", "model.vocab_size >= 2048"]),
        "token_id": (_data_sets(data, "bad_id"), ["token id 1500", "vocab_size 1024"]),
        "model_special_id": (["model.eos_token_id=7"] + _data_sets(data, "d128"),
                             ["eos id is 2", "eos_token_id is 7", "model.eos_token_id=2"]),
        "tokenizer_special_id": (_data_sets(data, "d128", "other_pad_tok"), ["pad id is 3", "has 4"]),
    }


CASES = ["batch", "microbatches", "weight_dim", "seq_len", "vocabulary", "token_id", "model_special_id",
         "tokenizer_special_id"]


def _nothing_written(workdir):
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


@pytest.mark.parametrize("case", CASES)
def test_train_stops_before_compiling(case, data, tmp_path, monkeypatch):
    from training import step as steps_lib
    from training.train import run_training

    def compiled(*args, **kwargs):
        raise AssertionError("the train step was set up: validation came too late")

    monkeypatch.setattr(steps_lib, "setup", compiled)
    overrides, expected = _cases(data)[case]
    workdir = str(tmp_path / "run")
    with pytest.raises((ValidationError, ShardingError)) as err:
        run_training(CPU_CONFIG, workdir, overrides)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)
    _nothing_written(workdir)


def test_the_cli_prints_one_line_and_exits_2(data, tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "normistral", "train", "--config", CPU_CONFIG, "--workdir", workdir]
    for item in _cases(data)["seq_len"][0]:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("normistral: error: data.dir ") and "packed at seq_len 64" in lines[-1]
    assert "Traceback" not in proc.stderr
    _nothing_written(workdir)


def _compile_check(workdir, overrides):
    cmd = [sys.executable, "-m", "normistral", "compile-check", "--config", TPU_CONFIG, "--topology", "v5e:2x2",
           "--mode", "train", "--workdir", workdir, "--json"]
    for item in overrides:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


# On the v5e:2x2 topology (4 chips): the same mistakes, sized for a 4-device mesh.
def _tpu_cases(data):
    cases = _cases(data)
    cases["batch"] = (["train.global_batch_size=6"] + _data_sets(data, "d128"), ["train.global_batch_size=6",
                                                                                 "fsdp=4", "multiple of 4"])
    cases["microbatches"] = (["train.global_batch_size=8", "train.microbatches=4"] + _data_sets(data, "d128"),
                             ["(8 / 4)=2", "fsdp=4", "multiple of 4"])
    cases["weight_dim"] = (["model.intermediate_size=342", "mesh.fsdp=1", "mesh.tensor=4"]
                           + _data_sets(data, "d128"), ["mlp", "342", "tensor=4", "divides 342"])
    # tiny-tpu-check.yaml computes in bfloat16: the data checks do not depend on it.
    return cases


@pytest.mark.parametrize("case", CASES)
def test_compile_check_runs_the_same_checks(case, data, tmp_path):
    overrides, expected = _tpu_cases(data)[case]
    proc = _compile_check(str(tmp_path), overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if x.strip()][-1]
    assert line.startswith("normistral: error: ")
    for part in expected:
        assert part in line, (part, line)
    assert not os.listdir(tmp_path)


def test_compile_check_of_a_valid_run_checks_its_data_and_fits(data, tmp_path):
    proc = _compile_check(str(tmp_path), _data_sets(data, "d128") + ["mesh.tensor=4", "mesh.fsdp=1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["data"] == f"checked {data['d128']}" and report["fits"] is True
    assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}  # KV heads (2) replicated by design


def test_kv_heads_replication_is_the_listed_exception():
    from jaxmodel.config import MistralConfig

    cfg = MistralConfig.tiny()  # 8 query heads, 2 KV heads
    check_divisible(abstract_model(cfg), make_mesh((1, 1, 8)))  # tensor 8 > 2 KV heads: replicated by design
    with pytest.raises(ShardingError, match="o_proj: dimension 1 \\(q_heads, 6\\)"):
        check_divisible(abstract_model(cfg.replace(num_attention_heads=6, num_key_value_heads=2)), make_mesh((1, 2, 4)))


def test_the_shipped_configs_pass(tmp_path):
    """The repository's training recipes divide their meshes (checked on meshes of their intended size)."""
    import jax

    from jaxmodel.run_config import load_run_config
    from jaxmodel.sharding import MESH_AXES
    from training.config import load

    for name, devices in (("normistral-11b-long-32k-v5p.yaml", 64), ("normistral-11b-long-8k-gpu.yaml", 8),
                          ("tiny-cpu.yaml", 8), ("normistral-11b-long-32k-v5p-512.yaml", 256),
                          ("normistral-11b-long-128k-v5p.yaml", 64), ("normistral-11b-long-32k-gpu.yaml", 8)):
        tree = load_run_config(os.path.join(REPO, "configs", name), [])
        tree["model"].pop("init_from", None)
        run = load(tree)
        check_run(run, jax.sharding.AbstractMesh(run.mesh.resolve(devices), MESH_AXES))


def test_prepare_data_refuses_a_vocabulary_larger_than_the_model(data, tmp_path):
    from training.prepare import prepare_data

    out = str(tmp_path / "out")
    with pytest.raises(ValidationError, match="2048-token vocabulary, but the model's vocab_size is 1024"):
        prepare_data(data["tok2048"], SOURCES, out, 128, progress=False, vocab_size=1024)
    assert not os.path.exists(out) and not os.listdir(tmp_path)
