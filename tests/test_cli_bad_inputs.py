"""Bad command-line inputs of generate, eval, parity and hub ids (issue 24): one line each, before the work.

Each case runs `normistral.main(argv)` in process (as tests/test_cli_errors.py does, whose `_fails` checks the
contract: exit status 2, the last stderr line `normistral: error: ...` naming the culprit, no traceback, no
output or hidden temporary left behind). Refusals that must come before the model loads use model directories
whose weights are truncated: an error about the flag, not about the weights, shows the order. Outputs that
must not be overwritten are compared byte for byte afterwards.
"""

import json
import os
import subprocess
import sys

import pytest

import normistral
from jaxmodel import MistralConfig
from jaxmodel import cli as jaxmodel_cli
from tests.test_cli_errors import _fails

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "inference", "eval_tasks")

# repo_cwd: the eval task YAMLs name their data from the repo root; offline: no network
pytestmark = pytest.mark.usefixtures("repo_cwd", "offline")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny: a model with its 398-token tokenizer; small: the same with vocab_size 256 and no tokenizer;
    deep: three layers instead of two; *_truncated: weights cut short (loading them fails)."""
    from jaxmodel.parity import make_hf_checkpoint
    from tests.inference.conftest import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("cli_bad_inputs")
    out = {name: str(root / name) for name in ("tiny", "small", "deep", "tiny_truncated", "small_truncated")}
    tok = train_tiny_tokenizer(out["tiny"])
    config = MistralConfig.tiny(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=3, bos_token_id=1,
                                eos_token_id=2)
    make_hf_checkpoint(out["tiny"], config, seed=3)
    make_hf_checkpoint(out["small"], config.replace(vocab_size=256), seed=3)
    make_hf_checkpoint(out["deep"], config.replace(num_hidden_layers=3), seed=3)
    for name in ("tiny", "small"):
        make_hf_checkpoint(out[f"{name}_truncated"], config.replace(vocab_size=256) if name == "small" else config)
        if name == "tiny":
            train_tiny_tokenizer(out["tiny_truncated"])
        with open(os.path.join(out[f"{name}_truncated"], "model.safetensors"), "r+b") as f:
            f.truncate(10_000)
    return out


def _prompts(tmp_path, *texts, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _eval_argv(model, *extra, tasks="nm_sentiment"):
    return ["eval", model, "--tasks", tasks, "--include-path", TASKS, "--dtype", "float32", *extra]


# -- item 2: a tokenizer larger than the model's vocabulary ----------------------------------------------------


def test_eval_refuses_a_tokenizer_larger_than_the_vocabulary_before_loading(models, tmp_path, capfd):
    out = tmp_path / "results.json"
    _fails(_eval_argv(models["small_truncated"], "--tokenizer", models["tiny"], "--output", out), capfd,
           [f"--tokenizer {models['tiny']} has 398 tokens but the model's vocab_size is 256"], outputs=[out])


def test_the_lm_eval_model_refuses_it_too(models):
    """`python -m inference.lm_eval_adapter run --model normistral ...` (a real process: lm-eval's command line
    configures logging once per process): the same refusal, one line, status 2."""
    cmd = [sys.executable, "-m", "inference.lm_eval_adapter", "run", "--model", "normistral", "--model_args",
           f"pretrained={models['small_truncated']},tokenizer={models['tiny']}", "--tasks", "nm_sentiment",
           "--include_path", TASKS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"normistral: error: tokenizer={models['tiny']!r} has 398 tokens but the model's vocab_size is "
                    "256: ids 256 and up have no embedding row; use the tokenizer the model was trained with"), last


# -- item 4: --output never destroys an existing file ----------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_existing_output_is_refused_without_overwrite(models, tmp_path, capfd, command):
    out = tmp_path / "taken.json"
    out.write_bytes(b"precious \xff bytes\n")
    argv = (["generate", models["tiny_truncated"], "--prompt", "hi"] if command == "generate"
            else _eval_argv(models["tiny_truncated"]))
    _fails([*argv, "--output", out], capfd, [f"--output {out} exists; pass --overwrite"])
    assert out.read_bytes() == b"precious \xff bytes\n"
    assert sorted(os.listdir(tmp_path)) == ["taken.json"]


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_generate_output_that_is_the_input_is_always_refused(models, tmp_path, capfd, spelling):
    source = _prompts(tmp_path, "Hei på deg", "Nordavind")
    before = source.read_bytes()
    out = {"same": source, "dotdot": tmp_path / ".." / tmp_path.name / "in.jsonl",
           "symlink": tmp_path / "link.jsonl", "hardlink": tmp_path / "hard.jsonl"}[spelling]
    if spelling == "symlink":
        os.symlink(source, out)
    elif spelling == "hardlink":
        os.link(source, out)
    _fails(["generate", models["tiny_truncated"], "--input", source, "--output", out, "--overwrite"], capfd,
           [f"--output {out} is the --input file"])
    assert source.read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_overwrite_replaces_the_output_with_the_complete_result(models, tmp_path, capfd):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n", encoding="utf-8")
    normistral.main(["generate", models["tiny"], "--prompt", "Hei på deg", "--max-new-tokens", "2", "--dtype",
                     "float32", "--output", str(out), "--overwrite"])
    printed = capfd.readouterr().out.strip().splitlines()
    assert out.read_text(encoding="utf-8").strip().splitlines() == printed
    assert json.loads(printed[0])["text"] == "Hei på deg"


# -- item 6: eval --limit is a count or a fraction ---------------------------------------------------------------


@pytest.mark.parametrize("limit", ["1.5", "0", "-2", "nan"])
def test_eval_limit_must_be_a_whole_count_or_a_fraction(models, capfd, limit):
    message = ("must be a finite number" if limit == "nan" else
               f"argument --limit: must be a whole number of documents (1 or more) or a fraction below 1, got {limit}")
    _fails(_eval_argv(models["tiny_truncated"], "--limit", limit), capfd, message)


def test_eval_limit_keeps_counts_and_fractions():
    assert jaxmodel_cli.limit("3") == 3 and isinstance(jaxmodel_cli.limit("3.0"), int)
    assert jaxmodel_cli.limit("0.25") == 0.25


# -- items 9 and 14: empty prompts, --group-size, bad bytes ------------------------------------------------------


def test_an_empty_prompt_is_refused(models, tmp_path, capfd):
    _fails(["generate", models["tiny_truncated"], "--prompt", "hi", ""], capfd, "--prompt 2 is empty")
    source = _prompts(tmp_path, "hi", "")
    _fails(["generate", models["tiny_truncated"], "--input", source, "--output", tmp_path / "out.jsonl"], capfd,
           f"{source}: prompt 2 is empty", outputs=[tmp_path / "out.jsonl"])


@pytest.mark.parametrize("argv", [
    ["generate", "{model}", "--prompt", "hi", "--group-size", "64"],
    ["generate", "{model}", "--prompt", "hi", "--quantize", "int8", "--group-size", "64"],
    ["serve", "{model}", "--group-size", "64"],
    ["eval", "{model}", "--tasks", "nm_sentiment", "--group-size", "64"],
])
def test_group_size_needs_int4(models, capfd, argv):
    _fails([a.format(model=models["tiny_truncated"]) for a in argv], capfd, "--group-size needs --quantize int4")


@pytest.mark.parametrize("size", ["0", "-1"])
def test_group_size_must_be_positive(models, capfd, size):
    _fails(["generate", models["tiny_truncated"], "--prompt", "hi", "--quantize", "int4", "--group-size", size],
           capfd, f"argument --group-size: must be a positive integer, got {size}")


def test_group_size_default_is_the_quantizer_s():
    from inference.quantize import DEFAULT_GROUP_SIZE

    args = normistral.build_parser().parse_args(["generate", "m", "--prompt", "x", "--quantize", "int4"])
    assert jaxmodel_cli.DEFAULT_GROUP_SIZE == DEFAULT_GROUP_SIZE == args.group_size


def test_input_with_invalid_utf8_names_the_file_and_line(models, tmp_path, capfd):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"text": "hei"}\n\n{"text": "p\xe5 deg"}\n')  # Latin-1, not UTF-8, on line 3
    _fails(["generate", models["tiny_truncated"], "--input", source], capfd,
           f"{source}:3: not valid UTF-8 (byte 12 of the line)")


# -- item 14: eval settings the tasks cannot honour --------------------------------------------------------------


def test_eval_num_fewshot_beyond_the_examples_is_refused_before_loading(models, capfd):
    _fails(_eval_argv(models["tiny_truncated"], "--num-fewshot", "1000"), capfd,
           "--num-fewshot 1000: task nm_sentiment has only 6 documents to draw few-shot examples from")


def test_eval_max_length_without_room_for_generation_is_refused_before_loading(models, capfd):
    _fails(_eval_argv(models["tiny_truncated"], "--max-length", "4", tasks="nm_sentiment,nm_translate"), capfd,
           "--max-length 4: leaves no room for a prompt in task nm_translate, which generates up to 16 tokens")


def test_eval_max_length_shorter_than_an_answer_is_one_line(models, capfd):
    """Only the scoring finds a continuation longer than the window (after the load): still one line."""
    _fails(_eval_argv(models["tiny"], "--max-length", "4", "--limit", "2"), capfd,
           ["--max-length 4: request", "tokens does not fit in a window of 4 tokens"])


@pytest.mark.parametrize("args, message", [
    (["--max-length", "100000"], "--max-length 100000: more than the model's context (512 tokens)"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    ([], "no tokenizer found (tokenizer.json); pass --tokenizer DIR"),
])
def test_eval_errors_name_the_user_s_flags(models, capfd, args, message):
    _fails(_eval_argv(models["small_truncated"], *args), capfd, message)


def test_eval_accepts_int4(models, tmp_path, capfd):
    out = tmp_path / "r.json"
    normistral.main(_eval_argv(models["tiny"], "--quantize", "int4", "--group-size", "32", "--limit", "2",
                               "--output", str(out)))
    capfd.readouterr()
    results = json.loads(out.read_text(encoding="utf-8"))
    assert 0.0 <= results["results"]["nm_sentiment"]["acc,none"] <= 1.0


# -- item 17: messages that say what is wrong ---------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["generate", "{model}", "--prompt", "hi", "--stop", "x"], "unrecognized arguments: --stop x"),
    (["eval", "{model}", "--tasks", "nm_sentiment", "--out", "{out}"], "unrecognized arguments: --out"),
    (["compile-check", "--config", "tiny-cpu", "--topology", "v5e:2x2", "--mod", "decode"],
     "unrecognized arguments: --mod decode"),
])
def test_abbreviated_flags_are_refused(models, tmp_path, capfd, argv, message):
    out = tmp_path / "r.json"
    _fails([a.format(model=models["tiny_truncated"], out=out) for a in argv], capfd, message, outputs=[out])


def test_eval_on_a_hub_id_not_in_the_cache_says_so(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _fails(_eval_argv("someorg/no-such-model"), capfd,
           ["someorg/no-such-model", "not in the local cache", "HF_HUB_OFFLINE is set; download it once online"])


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_empty_revision_is_named(capfd, command):
    argv = ["generate", "someorg/model@", "--prompt", "hi"] if command == "generate" else _eval_argv("someorg/model@")
    _fails(argv, capfd, "someorg/model@: the revision after @ is empty; write someorg/model@REVISION")


def test_parity_of_different_networks_names_the_fields(models, capfd):
    _fails(["parity", models["deep"], models["tiny"], "--length", "8"], capfd,
           f"{models['tiny']} is not the same network as {models['deep']}: their configs differ in "
           "num_hidden_layers 3 vs 2")


def test_compile_check_help_states_the_default_mode(capsys):
    with pytest.raises(SystemExit) as info:
        normistral.main(["compile-check", "--help"])
    assert info.value.code == 0
    assert "prefill (the default:" in " ".join(capsys.readouterr().out.split())
