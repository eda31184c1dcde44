"""`normistral train` with a `lora:` section (training/lora_train.py) on tiny float32 checkpoints.

- 30 steps of our LoRA training equal 30 steps of PEFT + torch.optim.AdamW from the same adapters (random
  non-zero A and B) on the same batches: the same loss at every step within 1e-4 relative (constant
  learning rate, the same betas, eps and decoupled weight decay, clipping off on both).
- The frozen base (full precision and int4) is bit-identical after training steps; only adapters change.
- A QLoRA run (int4 base, dropout on) killed with SIGKILL resumes with bit-identical losses.
- Bad `lora:` inputs are one-line errors before any work (real CLI subprocesses).
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
import yaml

from jaxmodel.run_config import load_run_config
from jaxmodel.sharding import make_mesh
from training import lora_train
from training import step as steps_lib
from training.config import load
from training.train import run_training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "normistral_gqa"
STEPS, BATCH, SEQ = 30, 8, 64
OPT = dict(learning_rate=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


class RandomBatches:
    """Batch `index` is a pure function of (seed, index): random ids from 32 of the vocabulary's tokens (the
    adapters learn that much, so the losses fall and the comparison is not of a flat line), one document per
    row, and a loss mask with holes (both frameworks must skip the same tokens)."""

    directory = "random-batches"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def batch(self, index, *, global_batch_size, process_index=0, process_count=1, seed=0, rows=None, columns=None):
        """As PackedDataset.batch: the rows and columns the trainer asks of this process (all by default)."""
        rng = np.random.default_rng([seed, index])
        ids = rng.integers(16, 48, size=(global_batch_size, SEQ + 1))
        full = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
                "segment_ids": np.ones((global_batch_size, SEQ), np.int32),
                "positions": np.broadcast_to(np.arange(SEQ), (global_batch_size, SEQ)),
                "loss_mask": (rng.random((global_batch_size, SEQ)) < 0.8).astype(np.float32)}
        rows = slice(None) if rows is None else np.asarray(rows)
        columns = slice(None) if columns is None else np.asarray(columns)
        return {k: np.asarray(v)[rows][:, columns] for k, v in full.items()}


def _yaml(path, base_dir, lora: dict, **sections) -> str:
    tree = {"model": {"init_from": base_dir, "dtype": "float32", "param_dtype": "float32", "remat": "none"},
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
            "train": {"steps": STEPS, "global_batch_size": BATCH, "seq_len": SEQ, "loss_chunk": SEQ,
                      "eval_every": 0},
            "optimizer": {**OPT, "schedule": "constant", "warmup_steps": 0, "clip_norm": None},
            "checkpoint": {"every": 100, "keep": 1}, "lora": lora}
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(tree, f)
    return str(path)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base_dir(hf_checkpoints):
    return hf_checkpoints[NAME]


@pytest.fixture(scope="module")
def vocab_size(base_dir):
    return json.load(open(os.path.join(base_dir, "config.json")))["vocab_size"]


@pytest.fixture(scope="module")
def peft_adapter(base_dir, tmp_path_factory):
    """A PEFT adapter with random non-zero A and B on every projection, rank 4, alpha 8."""
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lora_train.lora_lib.TARGETS),
                             lora_dropout=0.0, init_lora_weights=False)
    out = str(tmp_path_factory.mktemp("adapter") / "peft")
    peft.get_peft_model(hf, config).save_pretrained(out)
    return out


def _peft_losses(base_dir, adapter, dataset) -> list[float]:
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, adapter, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=OPT["learning_rate"], betas=(OPT["b1"], OPT["b2"]), eps=OPT["eps"],
                            weight_decay=OPT["weight_decay"])
    losses = []
    for step in range(STEPS):
        b = dataset.batch(step, global_batch_size=BATCH)
        logits = model(input_ids=torch.as_tensor(b["input_ids"]),
                       position_ids=torch.as_tensor(np.array(b["positions"]))).logits
        token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  torch.as_tensor(b["targets"]).reshape(-1), reduction="none")
        mask = torch.as_tensor(b["loss_mask"]).reshape(-1)
        loss = (token * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lora_training_matches_peft_and_torch_adamw_for_30_steps(base_dir, vocab_size, peft_adapter, tmp_path):
    dataset = RandomBatches(vocab_size)
    config = _yaml(tmp_path / "run.yaml", base_dir, {"rank": 4, "alpha": 8, "init_from_adapter": peft_adapter})
    workdir = str(tmp_path / "run")
    summary = run_training(config, workdir, datasets=(dataset, None))
    assert summary["step"] == STEPS
    ours = [r["loss"] for r in _metrics(workdir)]
    theirs = _peft_losses(base_dir, peft_adapter, dataset)
    assert len(ours) == len(theirs) == STEPS
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert np.mean(theirs[-4:]) < np.mean(theirs[:4]) - 0.03, theirs  # the adapters did learn
    # The checkpoint holds the adapters and their moments only: no base weight, no moment of one.
    step_dir = os.path.join(workdir, "checkpoints", str(STEPS))
    saved = json.load(open(os.path.join(step_dir, "params", "_METADATA")))["tree_metadata"]
    assert len(saved) == 2 * 7 and all("_lora', '" in key for key in saved), sorted(saved)
    assert json.load(open(os.path.join(step_dir, "meta", "metadata")))["lora"]["rank"] == 4


@pytest.mark.parametrize("base_quantize", [None, "int4"])
def test_the_frozen_base_is_bit_identical_after_training_steps(base_dir, vocab_size, tmp_path, base_quantize):
    config = _yaml(tmp_path / "run.yaml", base_dir, {"rank": 4, "dropout": 0.1, "base_quantize": base_quantize})
    run = load(load_run_config(config, []))
    ts = steps_lib.setup(run, make_mesh(run.mesh))
    frozen, adapters = lora_train.load_base(run, ts.mesh, ts.state_shardings["frozen"])
    state = {**steps_lib.state_from_params(ts, adapters), "frozen": frozen}
    before = jax.tree.map(np.asarray, jax.device_get(state))
    assert all("lora" in "/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(before["params"])[0])
    train_step, dataset = steps_lib.make_train_step(ts), RandomBatches(vocab_size)
    with jax.set_mesh(ts.mesh):
        for step in range(3):
            state, metrics = train_step(state, steps_lib.put_batch(ts, dataset.batch(step, global_batch_size=BATCH)))
            assert bool(metrics["finite"])
    after = jax.tree.map(np.asarray, jax.device_get(state))
    leaves = jax.tree_util.tree_leaves_with_path(before["frozen"])
    assert len(leaves) > 10
    kinds = {np.asarray(x).dtype.name for _, x in leaves}
    assert ("int4" in kinds) == (base_quantize == "int4"), kinds
    for (path, x), y in zip(leaves, jax.tree.leaves(after["frozen"]), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
    changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before["params"]),
                                                         jax.tree.leaves(after["params"]), strict=True)]
    assert all(changed)


# -- the CLI: resume after SIGKILL, bad inputs ----------------------------------------------------------------


def _cli(config, workdir, overrides=(), faults=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    env.pop("NORMISTRAL_FAULTS", None)
    if faults:
        env["NORMISTRAL_FAULTS"] = faults
    args = [sys.executable, "-m", "normistral", "train", "--config", config, "--workdir", workdir]
    for item in overrides:
        args += ["--set", item]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, proc.stderr


QLORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "base_quantize": "int4", "target_modules": ["q_proj", "v_proj",
                                                                                             "down_proj"]}
RESUME = {"steps": 6, "eval_every": 3, "eval_batches": 1}


def test_a_killed_qlora_run_resumes_bit_exactly(base_dir, tmp_path):
    data = {"corpus": "bundled", "dir": str(tmp_path / "data"), "tokenizer_dir": str(tmp_path / "tokenizer")}
    config = _yaml(tmp_path / "qlora.yaml", base_dir, QLORA, train=RESUME, data=data,
                   checkpoint={"every": 2, "keep": 5})
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    code, log, _ = _cli(config, straight)
    assert code == 0, log
    code, log, _ = _cli(config, broken, faults="kill_at_step=3")  # the step-2 checkpoint is the last one
    assert code == -signal.SIGKILL, log
    assert sorted(os.listdir(os.path.join(broken, "checkpoints"))) == ["2"]
    code, log, _ = _cli(config, broken)
    assert code == 0 and "resuming from checkpoint step 2" in log, log
    ours, theirs = _metrics(broken), _metrics(straight)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 7))
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]  # bit-identical floats
    assert [r["grad_norm"] for r in ours] == [r["grad_norm"] for r in theirs]
    assert [r.get("eval_loss") for r in ours] == [r.get("eval_loss") for r in theirs]
    # Resuming these adapters with another rank is refused before any work.
    code, log, err = _cli(config, broken, ["lora.rank=8", "train.steps=8"])
    assert code != 0 and "Traceback" not in err, log
    assert "the checkpoints there are of other adapters (lora.rank: 4 != 8)" in err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def other_base_adapter(hf_checkpoints, tmp_path_factory):
    """A PEFT adapter made for another architecture (MQA: k/v projections of another shape)."""
    hf = transformers.MistralForCausalLM.from_pretrained(hf_checkpoints["mqa"], dtype=torch.float32)
    out = str(tmp_path_factory.mktemp("other") / "peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    peft.get_peft_model(hf, config).save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["rank", "target", "not_peft", "other_base", "quantized_export"])
def test_bad_lora_inputs_are_one_line_errors_before_any_work(case, base_dir, other_base_adapter, tmp_path):
    lora, train, culprit = {"rank": 4, "alpha": 8}, {}, None
    if case == "rank":
        lora["rank"], culprit = 0, "lora.rank must be a positive integer, got 0"
    elif case == "target":
        lora["target_modules"] = ["q_proj", "qkv_proj"]
        culprit = "lora.target_modules: unknown LoRA target module 'qkv_proj' (known: q_proj k_proj"
    elif case == "not_peft":
        lora["init_from_adapter"] = base_dir
        culprit = f"lora.init_from_adapter {base_dir}: not a PEFT adapter directory (no adapter_config.json)"
    elif case == "other_base":
        lora.update(init_from_adapter=other_base_adapter, target_modules=["q_proj", "k_proj"])
        culprit = "(an adapter for another base model?)"
    else:
        lora["base_quantize"], train = "int8", {"export_hf": "hf"}
        culprit = "train.export_hf writes the adapters merged into the base, which cannot be done over a int8 base"
    config = _yaml(tmp_path / "bad.yaml", base_dir, lora, train=train, data={"dir": str(tmp_path / "no-data")})
    workdir = str(tmp_path / "w")
    code, log, err = _cli(config, workdir)
    last = err.strip().splitlines()[-1]
    assert code != 0 and "Traceback" not in err, log
    assert last.startswith("normistral: error: ") and culprit in last, last
    assert "bad.yaml" in last
    assert not os.path.exists(workdir)  # nothing made, nothing loaded: refused first
