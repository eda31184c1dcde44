"""`normistral eval` and `train.eval_tasks` end to end, offline, on a tiny training run.

One module-scoped run of configs/tiny-cpu.yaml (20 steps, 8 simulated devices) through the real CLI
entry point with `train.eval_tasks`: it logs lm-eval scores every 10 steps, saves checkpoints/20 and
exports the final weights to Hugging Face format. Then: the checkpoint step evaluates to the numbers of
its export, the logged scores are the numbers `normistral eval` computes for that step, and bad input
fails with one line.
"""

import json
import os

import pytest

import normistral

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny-cpu.yaml")
TASKS = os.path.join(ROOT, "tests", "inference", "eval_tasks")
ALL_TASKS = "nm_sentiment,nm_perplexity,nm_translate"


# repo_cwd: the task YAMLs name data relative to the repo; offline: no network (this module only)
pytestmark = pytest.mark.usefixtures("repo_cwd", "offline")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("evalrun") / "run")
    overrides = ["train.steps=20", "train.eval_every=10", "checkpoint.every=10", "train.export_hf=hf",
                 "train.eval_tasks=[nm_sentiment,nm_perplexity]", "train.eval_limit=6",
                 f"train.eval_include_path={TASKS}"]
    normistral.main(["train", "--config", CONFIG, "--workdir", workdir] + [a for o in overrides for a in ("--set", o)])
    return workdir


def _eval(capsys, model, out, *extra):
    normistral.main(["eval", model, "--tasks", ALL_TASKS, "--include-path", TASKS, "--dtype", "float32",
                     "--output", out, *extra])
    printed = capsys.readouterr().out
    with open(out, encoding="utf-8") as f:
        return json.load(f), printed


def _scores(results):
    from inference.eval_tasks import scores

    return scores(results)


def test_checkpoint_step_evaluates_like_its_hf_export(run_dir, tmp_path, capsys):
    step, printed = _eval(capsys, os.path.join(run_dir, "checkpoints", "20"), str(tmp_path / "step.json"))
    assert "nm_sentiment" in printed and "bits_per_byte" in printed  # lm-eval's table
    hf, _ = _eval(capsys, os.path.join(run_dir, "hf"), str(tmp_path / "hf.json"), "--tokenizer",
                  os.path.join(run_dir, "tokenizer"))
    a, b = _scores(step), _scores(hf)
    assert a.keys() == b.keys()
    assert {"nm_sentiment/acc", "nm_perplexity/word_perplexity", "nm_translate/chrf"} <= a.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    assert 1.0 < a["nm_perplexity/byte_perplexity"] < 50.0  # the trained toy, not a random one


def test_train_eval_tasks_are_logged(run_dir, tmp_path, capsys):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    logged = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in lines}
    assert [s for s, v in logged.items() if v] == [10, 20]
    assert {"eval/nm_sentiment/acc", "eval/nm_perplexity/bits_per_byte"} <= logged[20].keys()
    assert logged[10]["eval/nm_perplexity/bits_per_byte"] > logged[20]["eval/nm_perplexity/bits_per_byte"]
    # The scores the run logged at step 20 are the ones `normistral eval` gives for that checkpoint.
    normistral.main(["eval", os.path.join(run_dir, "checkpoints", "20"), "--tasks", "nm_sentiment,nm_perplexity",
                     "--include-path", TASKS, "--dtype", "float32", "--limit", "6", "--output",
                     str(tmp_path / "r.json")])
    capsys.readouterr()
    with open(tmp_path / "r.json", encoding="utf-8") as f:
        fresh = _scores(json.load(f))
    for key, value in fresh.items():
        assert logged[20][f"eval/{key}"] == pytest.approx(value, rel=1e-5), key
    events = os.listdir(os.path.join(run_dir, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)


@pytest.mark.parametrize("case", ["unknown_task", "missing_model", "dataset_offline", "bad_fewshot"])
def test_bad_input_is_one_line_error(case, run_dir, tmp_path, capsys):
    model, tasks = os.path.join(run_dir, "hf"), "nm_sentiment"
    extra = ["--tokenizer", os.path.join(run_dir, "tokenizer")]
    expect = {"unknown_task": "unknown task(s): nm_no_such_task", "missing_model": "model directory not found",
              "dataset_offline": "nm_needs_hub: could not load the data", "bad_fewshot": "--num-fewshot -1"}[case]
    if case == "unknown_task":
        tasks = "nm_sentiment,nm_no_such_task"
    elif case == "missing_model":
        model = str(tmp_path / "nowhere")
    elif case == "dataset_offline":
        tasks = "nm_needs_hub"
    else:
        extra += ["--num-fewshot", "-1"]
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as e:
        normistral.main(["eval", model, "--tasks", tasks, "--include-path", TASKS, "--output", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err[-1].startswith("normistral: error: ") and expect in err[-1], err[-1]
    assert not out.exists()
