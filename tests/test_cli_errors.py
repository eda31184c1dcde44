"""Every bad input a one-line error: the cases of issue 17's trial of the CLI, one test each.

Each case runs `normistral.main(argv)` in process (subprocesses only where a real process is needed: a
stray traceback printed at interpreter exit, Ctrl-C, kill -9) and asserts: exit status 2, the last line of
standard error starts with `normistral: error:` and names the culprit (the flag, the file and line, the
numbers), no traceback, and nothing half-written (no output, no hidden `.NAME.tmp-*` sibling). Cases that
must be refused before expensive work use a model directory whose weights are truncated: an error about
the flag rather than about the weights shows that the flag was checked before the model loaded.
"""

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

import normistral
from jaxmodel import MistralConfig
from jaxmodel.run_config import SECTIONS
from tests.random_weights import write_random_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CPU = os.path.join(ROOT, "configs", "tiny-cpu.yaml")
TPU_CHECK = os.path.join(ROOT, "configs", "tiny-tpu-check.yaml")


# -- fixtures: one tiny model directory (with tokenizer), its import-hf copy, and damaged variants ----------


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    from jaxmodel.convert import import_hf
    from jaxmodel.parity import make_hf_checkpoint
    from tests.inference.conftest import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("cli_errors")
    hf = str(root / "hf")
    tok = train_tiny_tokenizer(hf)
    make_hf_checkpoint(hf, MistralConfig.tiny(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=3,
                                              bos_token_id=1, eos_token_id=2), seed=3)
    orbax = str(root / "orbax")
    import_hf(hf, orbax, progress=False)
    out = {"root": str(root), "hf": hf, "orbax": orbax}

    def variant(name, source, damage):
        path = str(root / name)
        shutil.copytree(source, path)
        damage(path)
        out[name] = path

    def set_config(path, **changes):
        file = os.path.join(path, "config.json")
        with open(file) as f:
            config = json.load(f)
        with open(file, "w") as f:
            json.dump({**config, **changes}, f)

    def truncate(file, size):
        with open(file, "r+b") as f:
            f.truncate(size)

    variant("hf_truncated", hf, lambda p: truncate(os.path.join(p, "model.safetensors"), 100_000))
    variant("hf_mismatch", hf, lambda p: set_config(p, intermediate_size=100))
    variant("hf_garbage_config", hf, lambda p: open(os.path.join(p, "config.json"), "w").write("{garbage"))
    variant("orbax_mismatch", orbax, lambda p: set_config(p, intermediate_size=100))

    def truncate_chunks(path):
        data = os.path.join(path, "params", "ocdbt.process_0", "d")
        for name in os.listdir(data):
            truncate(os.path.join(data, name), 100)

    variant("orbax_truncated", orbax, truncate_chunks)
    return out


def _leftovers(path: str) -> list[str]:
    """The output itself and any hidden temporary sibling of it (`.NAME.tmp-*`)."""
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    return [e for e in os.listdir(parent) if e == name or e.startswith(f".{name}.tmp-")]


def _fails(argv, capfd, culprit, *, outputs=(), status=2):
    """Runs the command in process; checks the error contract; returns the last line of stderr."""
    with pytest.raises(SystemExit) as info:
        normistral.main([str(a) for a in argv])
    err = capfd.readouterr().err
    assert info.value.code == status, err
    assert "Traceback" not in err, err
    last = err.strip().split("\n")[-1]  # lines end in \n only: a progress bar's \r must not precede the error
    assert last.startswith("normistral: error: ") and "\r" not in last, repr(err[-2000:])
    for text in [culprit] if isinstance(culprit, str) else culprit:
        assert text in last, last
    assert ".tmp-" not in last, last  # the user's path is named, never an internal temporary
    for out in outputs:
        assert not _leftovers(out), f"half-written output left behind: {_leftovers(out)}"
    return last


# -- run configs: unknown keys, the --set argument, YAML lines --------------------------------------------


def _yaml(tmp_path, text: str, name="run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_set_with_an_unknown_section_is_an_error_naming_the_set(tmp_path, capfd):
    work = tmp_path / "w"
    _fails(["train", "--config", TINY_CPU, "--workdir", work, "--set", "bogus.x=1"], capfd,
           ["--set bogus.x=1", "bogus is not a section"], outputs=[work])


def test_misspelled_top_level_section_names_file_and_line(tmp_path, capfd):
    with open(TINY_CPU, encoding="utf-8") as f:
        text = f.read()
    line = text.splitlines().index("optimizer:") + 1
    config = _yaml(tmp_path, text.replace("optimizer:", "optimiser:"))
    work = tmp_path / "w"
    _fails(["train", "--config", config, "--workdir", work], capfd,
           [f"run.yaml:{line}: optimiser is not a section", "did you mean optimizer?"], outputs=[work])


@pytest.mark.parametrize("setting, message", [
    ("train.steps=-3", "train.steps must be a positive integer, got -3"),
    ("train.seed=abc", "train.seed must be int, got 'abc'"),
    ("optimizer.learning_rate=fast", "optimizer.learning_rate must be float, got 'fast'"),
    ("model.num_key_value_heads=3", "num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
    ("mesh.data=x", "mesh.data must be int"),
    ("train.steps.x=1", "train.steps is not a section"),
    ("train.steps=[1", "not valid YAML"),
    ("train", "expected section.key=value"),
])
def test_set_errors_name_the_set_argument_not_the_yaml(tmp_path, capfd, setting, message):
    work = tmp_path / "w"
    last = _fails(["train", "--config", TINY_CPU, "--workdir", work, "--set", setting], capfd,
                  [f"--set {setting}", message], outputs=[work])
    assert "tiny-cpu.yaml" not in last


def test_a_bad_value_in_the_yaml_names_its_line(tmp_path, capfd):
    config = _yaml(tmp_path, "model:\n  preset: tiny\ntrain:\n  steps: 10\n  seq_len: long\n")
    _fails(["train", "--config", config, "--workdir", tmp_path / "w"], capfd,
           "run.yaml:5: train.seq_len must be int, got 'long'", outputs=[tmp_path / "w"])


def test_yaml_syntax_error_names_the_line(tmp_path, capfd):
    config = _yaml(tmp_path, "model:\n  preset: tiny\ntrain:\n  steps: [1\n  seq_len: 8\n")
    _fails(["train", "--config", config, "--workdir", tmp_path / "w"], capfd,
           ["run.yaml:5: not valid YAML", "expected ',' or ']'"], outputs=[tmp_path / "w"])


def _section_options() -> dict[str, list[str]]:
    """Every documented section and its known keys (the dataclasses that read them)."""
    import dataclasses

    from inference.config import InferenceConfig
    from jaxmodel.sharding import MeshShape
    from training.config import CheckpointConfig, DataConfig, LoraSection, OptimizerConfig, TrainConfig

    classes = {"mesh": MeshShape, "train": TrainConfig, "optimizer": OptimizerConfig, "data": DataConfig,
               "checkpoint": CheckpointConfig, "inference": InferenceConfig, "lora": LoraSection}
    options = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in classes.items()}
    options["model"] = [f.name for f in dataclasses.fields(MistralConfig)] + ["preset", "hf_config", "init_from"]
    return options


@pytest.mark.parametrize("command", ["train", "compile-check"])
@pytest.mark.parametrize("source", ["yaml", "set"])
def test_the_whole_config_surface_rejects_unknown_keys_at_every_level(tmp_path, capfd, command, source):
    """Top-level sections and every key of every section, from the YAML file and from --set, through both
    commands that read run configs (each reads every section, so a typo anywhere is caught by either)."""
    options = _section_options()
    assert sorted(options) == sorted(SECTIONS)  # the README's list of sections is the one checked
    base = "model:\n  preset: tiny\n"
    argv = {"train": ["train", "--workdir", tmp_path / "w"],
            "compile-check": ["compile-check", "--topology", "v5e:2x2", "--mode", "prefill"]}[command]
    wrong = [("optimiser", None)] + [(section, f"{options[section][0]}x") for section in SECTIONS]
    for section, key in wrong:
        dotted = section if key is None else f"{section}.{key}"
        if source == "yaml":
            body = f"{section}: {{a: 1}}\n" if key is None else f"{section}:\n  {key}: 1\n"
            if section == "model":
                body = f"model:\n  preset: tiny\n  {key}: 1\n"
            config, extra = _yaml(tmp_path, (base if section != "model" else "") + body), []
            culprit = f"run.yaml:{3 if key is None or section == 'model' else 4}: {dotted} is not"
        else:
            config, extra = _yaml(tmp_path, base), ["--set", f"{dotted}{'.a' if key is None else ''}=1"]
            culprit = f"--set {dotted}{'.a' if key is None else ''}=1: {dotted} is not"
        _fails([*argv, "--config", config, *extra], capfd, culprit, outputs=[tmp_path / "w"])


# -- generate ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template, message", [
    ("text without a placeholder", "has no {0} placeholder"),
    ("X {1}", "unknown field {1}"),
    ("{0", "not a format string"),
    ("{text}", "unknown field {text}"),
])
def test_generate_refuses_a_template_that_would_not_place_the_prompt(dirs, tmp_path, capfd, template, message):
    out = tmp_path / "out.jsonl"
    _fails(["generate", dirs["hf_truncated"], "--prompt", "hi", "--template", template, "--output", out], capfd,
           ["--template", repr(template), message], outputs=[out])


def test_api_refuses_the_same_templates(dirs):
    from jaxmodel.checks import TemplateError, check_template

    for template in ("no placeholder", "X {1}", "{0", "{text}"):
        with pytest.raises(TemplateError):
            check_template(template)
    for template in ("Engelsk: {0}\nBokmål:", "{} x", "{0}: {0}", "{{x}} {0}"):
        assert check_template(template) == template


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--batch-size"])
def test_zero_counts_name_their_flag_before_the_model_loads(dirs, tmp_path, capfd, flag):
    out = tmp_path / "out.jsonl"
    _fails(["generate", dirs["hf_truncated"], "--prompt", "hi", flag, "0", "--output", out], capfd,
           [f"argument {flag}: must be a positive integer, got 0"], outputs=[out])


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "argument --top-p: must lie in (0, 1]"),
    (["--top-k", "-1"], "argument --top-k: must be an integer in [0, 2^31), got -1"),
    (["--top-k", "2147483648"], "argument --top-k: must be an integer in [0, 2^31), got 2147483648"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number"),
    (["--batch-size", "x"], "argument --batch-size: expected an integer, got 'x'"),
    (["--mesh", "1,2"], "--mesh '1,2': expected DATA,FSDP,TENSOR"),
])
def test_generate_flags_are_checked_by_type_and_range(dirs, tmp_path, capfd, args, message):
    _fails(["generate", dirs["hf"], "--prompt", "hi", *args], capfd, message)


def test_generate_output_that_is_a_directory_fails_before_the_model_loads(dirs, tmp_path, capfd):
    (tmp_path / "taken").mkdir()
    _fails(["generate", dirs["hf_truncated"], "--prompt", "hi", "--output", tmp_path / "taken"], capfd,
           [str(tmp_path / "taken"), "is a directory, expected a file"])
    assert os.listdir(tmp_path / "taken") == []


def test_generate_output_in_a_missing_directory_names_it(dirs, tmp_path, capfd):
    out = tmp_path / "nodir" / "sub" / "out.jsonl"
    _fails(["generate", dirs["hf_truncated"], "--prompt", "hi", "--output", out], capfd,
           f"parent directory {tmp_path / 'nodir' / 'sub'} does not exist")
    assert not (tmp_path / "nodir").exists()


@pytest.mark.parametrize("where", [
    "/sys/normistral-out.jsonl",  # a pseudo file system: not writable even by root
    pytest.param("readonly", marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into mode 555")),
])
def test_generate_output_in_an_unwritable_place(dirs, tmp_path, capfd, where):
    if where == "readonly":
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        where = str(tmp_path / "ro" / "out.jsonl")
    _fails(["generate", dirs["hf_truncated"], "--prompt", "hi", "--output", where], capfd, [where, "writ"],
           outputs=[where])


def test_generate_on_a_garbage_config_json_names_the_config(dirs, capfd):
    last = _fails(["generate", dirs["hf_garbage_config"], "--prompt", "hi"], capfd,
                  "hf_garbage_config/config.json:1: not valid JSON")
    assert "tokenizer" not in last


def test_generate_jsonl_error_names_line_and_column(dirs, tmp_path, capfd):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"text": "a"}\n{"text": "abc, "id": 3}\n', encoding="utf-8")
    last = _fails(["generate", dirs["hf"], "--input", prompts], capfd, ["in.jsonl:2: not valid JSON", "column"])
    assert "at at" not in last


def test_generate_input_that_is_a_directory(dirs, tmp_path, capfd):
    _fails(["generate", dirs["hf"], "--input", tmp_path], capfd, [str(tmp_path), "is a directory"])


def test_generate_tokenizer_directory_without_a_tokenizer(dirs, tmp_path, capfd):
    _fails(["generate", dirs["hf"], "--prompt", "hi", "--tokenizer", tmp_path], capfd,
           [str(tmp_path), "no tokenizer there"])


def test_build_tokenizer_json_error_has_line_and_column(tmp_path, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "Unterminated\n', encoding="utf-8")
    last = _fails(["build-tokenizer", "--input", bad, "--output", tmp_path / "tok"], capfd,
                  ["bad.jsonl:2: not valid JSON", "column"], outputs=[tmp_path / "tok"])
    assert "at at" not in last


# -- import-hf / export-hf / parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("dest", ["/sys/normistral-x", "/proc/normistral-x"])
def test_import_into_an_unwritable_place_names_the_destination(dirs, capfd, dest):
    _fails(["import-hf", dirs["hf"], dest], capfd, [f"{dest}: cannot write in {os.path.dirname(dest)}"])


def test_import_into_a_read_only_directory(dirs, tmp_path, capfd):
    if os.geteuid() == 0:
        pytest.skip("root writes into a mode-555 directory; /sys and /proc cover root (test above)")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    _fails(["import-hf", dirs["hf"], tmp_path / "ro" / "x"], capfd, "is not writable")


def test_destination_that_is_a_file(dirs, tmp_path, capfd):
    (tmp_path / "taken").write_text("x")
    for argv in (["import-hf", dirs["hf"]], ["export-hf", dirs["orbax"]]):
        _fails([*argv, tmp_path / "taken"], capfd, "taken: exists and is a file, expected a new directory")
        assert (tmp_path / "taken").read_text() == "x"


def test_input_that_is_a_file(dirs, tmp_path, capfd):
    weights = os.path.join(dirs["hf"], "model.safetensors")
    _fails(["import-hf", weights, tmp_path / "out"], capfd,
           "model.safetensors: is a file, expected a Hugging Face model directory", outputs=[tmp_path / "out"])
    _fails(["export-hf", weights, tmp_path / "out"], capfd, "model.safetensors: is a file",
           outputs=[tmp_path / "out"])
    _fails(["parity", dirs["hf"], weights], capfd, "model.safetensors: is a file")


def test_export_of_truncated_orbax_files(dirs, tmp_path, capfd):
    out = tmp_path / "exported"
    _fails(["export-hf", dirs["orbax_truncated"], out], capfd, ["orbax_truncated/params", "truncated or corrupt"],
           outputs=[out])


def test_parity_on_a_truncated_safetensors_file(dirs, capfd):
    _fails(["parity", dirs["hf_truncated"]], capfd, "model.safetensors: truncated safetensors file")


@pytest.mark.parametrize("args, message", [
    (["--length", "0"], "argument --length: must be a positive integer, got 0"),
    (["--length", "100000"], "length 100000 must lie in [1, 512]"),
    (["--offset", "-5"], "argument --offset: must be a non-negative integer"),
])
def test_parity_ranges(dirs, capfd, args, message):
    _fails(["parity", dirs["hf"], *args], capfd, message)


@pytest.mark.parametrize("argv, culprit", [
    (["export-hf", "{orbax_mismatch}", "{out}"], "layers.mlp.down_proj has shape (2, 352, 128)"),
    (["parity", "{hf_mismatch}"], "gate_proj.weight has shape (352, 128), config.json implies (100, 128)"),
])
def test_config_mismatch_is_one_line_without_a_stray_traceback_at_exit(dirs, tmp_path, argv, culprit):
    """A real process: the stray `RuntimeError: Event loop is closed` was printed at interpreter exit."""
    out = str(tmp_path / "out")
    argv = [a.format(out=out, **dirs) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "normistral", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().split("\n")[-1]
    assert last.startswith("normistral: error: ") and culprit in last, proc.stderr[-3000:]
    assert not _leftovers(out)


# -- compile-check ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("topology, message", [
    ("v5e:2x2x2", "v5e slices are 2-D, expected v5e:AxB"),
    ("v6e:4x4x1", "v6e slices are 2-D"),
    ("v5p:4x4", "v5p slices are 3-D, expected v5p:AxBxC"),
    ("v5e:0x2", "positive sizes"),
    ("tpu7:2x2", "with a generation of v4, v5p, v5e, v6e"),
])
def test_compile_check_topology_dimensions(capfd, topology, message):
    _fails(["compile-check", "--config", TPU_CHECK, "--topology", topology], capfd, [repr(topology), message])


# -- train and demo: arguments checked before any work -------------------------------------------------------


def test_demo_negative_steps_says_what_was_given_before_building_anything(tmp_path, capfd):
    work = tmp_path / "demo"
    last = _fails(["demo", "--workdir", work, "--steps", "-3"], capfd,
                  "argument --steps: must be a positive integer, got -3", outputs=[work])
    assert "-2" not in last
    _fails(["demo", "--workdir", work, "--steps", "1"], capfd,
           ["argument --steps: the demo needs at least 2 training steps", "got 1"], outputs=[work])


def test_train_with_a_missing_init_from_fails_before_building_data(tmp_path, capfd):
    work = tmp_path / "w"
    _fails(["train", "--config", TINY_CPU, "--workdir", work, "--set", f"model.init_from={tmp_path / 'none'}"],
           capfd, [f"--set model.init_from={tmp_path / 'none'}", "does not exist"], outputs=[work])


@pytest.mark.parametrize("command", ["train", "demo"])
def test_workdir_that_is_a_file(tmp_path, capfd, command):
    (tmp_path / "file").write_text("x")
    argv = {"train": ["train", "--config", TINY_CPU], "demo": ["demo"]}[command]
    last = _fails([*argv, "--workdir", tmp_path / "file"], capfd,
                  [str(tmp_path / "file"), "is a file, expected a directory"])
    assert "Errno" not in last and (tmp_path / "file").read_text() == "x"


def test_train_workdir_that_cannot_be_created(capfd):
    last = _fails(["train", "--config", TINY_CPU, "--workdir", "/proc/normistral-run"], capfd,
                  "/proc/normistral-run: cannot create the run directory (--workdir)")
    assert "Errno" not in last


# -- real processes: Ctrl-C and kill -9 during import-hf --------------------------------------------------


@pytest.fixture(scope="module")
def deep_hf(tmp_path_factory):
    """A 24-layer toy Hugging Face directory (219 tensors: import-hf takes a few seconds, long enough to be
    interrupted), written straight with safetensors: import-hf reads only shapes and bytes."""
    path = tmp_path_factory.mktemp("deep") / "hf"
    path.mkdir()
    return write_random_hf(path, MistralConfig.tiny(num_hidden_layers=24))


def _start_import(src: str, dest: str) -> tuple[subprocess.Popen, bytes]:
    """Starts `normistral import-hf` and returns once it is writing tensors (its progress bar moved)."""
    proc = subprocess.Popen([sys.executable, "-m", "normistral", "import-hf", src, dest], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    seen, deadline = b"", time.time() + 240
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
            if re.search(rb"\b[1-9][0-9]*/219 \[", seen):
                return proc, seen
    proc.kill()
    raise AssertionError(f"import-hf never started writing tensors: {seen[-2000:]!r}")


def test_ctrl_c_during_import_is_one_line_exit_130_and_leaves_nothing(deep_hf, tmp_path):
    dest = str(tmp_path / "ckpt")
    proc, seen = _start_import(deep_hf, dest)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    err = (seen + rest).decode("utf-8", "replace")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().split("\n")[-1]
    assert last.startswith("normistral: error: interrupted"), repr(err[-2000:])  # its own line, not after a bar
    assert not _leftovers(dest), _leftovers(dest)


def test_kill_9_during_import_leaves_a_temporary_that_the_rerun_removes(deep_hf, tmp_path, capfd):
    dest = str(tmp_path / "ckpt")
    proc, _ = _start_import(deep_hf, dest)
    proc.kill()  # SIGKILL: no cleanup runs
    proc.wait(timeout=60)
    stale = [e for e in os.listdir(tmp_path) if e.startswith(".ckpt.tmp-")]
    assert stale and not os.path.exists(dest)  # what a kill -9 leaves: one hidden temporary, no output
    normistral.main(["import-hf", deep_hf, dest])
    err = capfd.readouterr().err
    assert f"removed {os.path.join(str(tmp_path), stale[0])}, left by an interrupted run" in err
    assert os.listdir(tmp_path) == ["ckpt"] and os.path.isdir(os.path.join(dest, "params"))
