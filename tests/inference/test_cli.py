"""The command line: `normistral generate` (in process) and `normistral compile-check --mode decode` (subprocess)."""

import json
import os
import subprocess
import sys

import pytest

import normistral

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(argv):
    normistral.main(argv)


def test_generate_writes_jsonl(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    lines = [{"text": "I like cheese.", "id": 1}, {"text": "Where is the train station?", "id": 2},
             {"text": "The weather is nice.", "id": 3}]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    _run(["generate", tiny_dir, "--input", str(prompts), "--template", r"Engelsk: {0}\nBokmål:", "--max-new-tokens",
          "8", "--batch-size", "2", "--stop-at-newline", "--output", str(out), "--dtype", "float32"])
    written = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in written] == [1, 2, 3]  # input order, other fields kept
    assert all(isinstance(r["output"], str) and "\n" not in r["output"] for r in written)
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert printed == written


def test_generate_prompts_match_the_api(tiny_dir, capsys):
    from inference import Generator

    _run(["generate", tiny_dir, "--prompt", "Hei på deg", "Nordavind", "--max-new-tokens", "5", "--dtype",
          "float32"])
    printed = [json.loads(x)["output"] for x in capsys.readouterr().out.splitlines()]
    gen = Generator.from_pretrained(tiny_dir, dtype="float32")
    assert printed == gen.generate(["Hei på deg", "Nordavind"], max_new_tokens=5)


@pytest.mark.parametrize("case", ["missing_dir", "empty_file", "no_text", "bad_json", "too_long", "no_prompt"])
def test_generate_bad_inputs_exit_2_with_one_line(tiny_dir, tmp_path, capsys, case):
    path = tmp_path / "in.jsonl"
    argv = ["generate", tiny_dir, "--input", str(path), "--output", str(tmp_path / "out.jsonl")]
    expected = {"missing_dir": "nowhere: no such file or directory", "empty_file": "no prompts in the file",
                "no_text": 'in.jsonl:2: expected an object with a string field "text"',
                "bad_json": "in.jsonl:1: not valid JSON", "too_long": "in.jsonl: prompt 1 has",
                "no_prompt": "--prompt"}[case]
    if case == "missing_dir":
        argv[1] = str(tmp_path / "nowhere")
        path.write_text('{"text": "x"}\n')
    elif case == "empty_file":
        path.write_text("\n")
    elif case == "no_text":
        path.write_text('{"text": "x"}\n{"prompt": "y"}\n')
    elif case == "bad_json":
        path.write_text("{text: x}\n")
    elif case == "too_long":
        path.write_text(json.dumps({"text": "Hei på deg! " * 200}) + "\n")  # > 512 tokens of context
    elif case == "no_prompt":
        argv = ["generate", tiny_dir, "--prompt"]
    with pytest.raises(SystemExit) as exit_info:
        _run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert expected in err[-1], err
    if case != "no_prompt":  # argparse's own usage error prints usage first
        assert len(err) == 1 and err[0].startswith("normistral: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) in (["in.jsonl"], [])  # no output, no temp file left


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_compile_check_decode_for_a_tpu_slice(quantize):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    cmd = [sys.executable, "-m", "normistral", "compile-check", "--config", "configs/tiny-tpu-check.yaml",
           "--topology", "v5e:2x2", "--mode", "decode", "--set", f"inference.quantize={quantize}",
           "--set", "inference.kv_cache_dtype=int8", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mode"] == "decode" and report["devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["quantize"] == quantize and report["kv_cache_dtype"] == "int8"
    assert report["batch_size"] == 8 and report["prompt_length"] + report["new_tokens"] == report["max_length"]
    assert report["fits"]
    engine = report["engine"]  # the paged engine: max_num_seqs = the config's batch size, the model's context
    assert engine["max_num_seqs"] == 8 and engine["max_model_len"] == 32768 and engine["fits"]
    pool = engine["pool"]  # default: pages for 8 sequences of max_model_len
    assert pool["pages"] == 8 * 32768 // 16 and pool["tokens"] == pool["pages"] * 16
    assert engine["pool_holds_max_model_len"]
    assert engine["max_concurrent_seqs"] == 8 and pool["laid_out_bytes_per_device"] >= pool["bytes_per_device"] > 0
    assert engine["programs"] == 2 * len(engine["widths"]) and len(engine["steps"]) == 3
    assert all(step["fits"] and step["alias_bytes"] > 0 for step in engine["steps"].values())  # the pool in place


@pytest.mark.parametrize("name", ["v5e-1-int8", "v5e-4", "v6e-1", "gpu-80gb", "v5e-1-int4", "8gb-int4"])
def test_inference_configs_parse(name):
    from inference.config import inference_config
    from jaxmodel import run_config

    tree = run_config.load_run_config(os.path.join(ROOT, "configs", f"normistral-11b-long-infer-{name}.yaml"))
    config, opts = run_config.model_config(tree), inference_config(tree)
    assert config.num_hidden_layers == 40 and config.param_dtype == "bfloat16"
    assert opts.max_length <= config.max_position_embeddings
    assert opts.quantize == {"v5e-1-int8": "int8", "v5e-1-int4": "int4", "8gb-int4": "int4"}.get(name)
    assert opts.memory_gib == (8 if name == "8gb-int4" else None)
