"""The paged engine from the command line: `normistral serve` with the pool flags (a real server, the official
`openai` client), the flags' one-line refusals before the model loads, the persistent compilation cache (a
second `normistral generate` process compiles nothing new) and Generator's load-time warm-up (its first
call over 128 prompts compiles nothing)."""

import os
import re
import shutil
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.inference.serving import ENV, ROOT, start_serve, stop_serve

PAGE = 16
PAGE_BYTES = 2 * PAGE * 4 * 32 * 4  # the tiny model: 2 layers x 16 tokens x (2 x 2 kv heads) x head_dim 32 x float32
POOL = "1MiB"  # 64 pages: 4 sequences of 256 tokens
WARMED = re.compile(r"generator: (\d+) programs ready in \S+ s \((\d+) compilations?, (\d+) from the persistent "
                    r"cache\)")  # (with the cache off: "persistent cache off")


def _env(cache_home: str, **extra) -> dict:
    env = {**ENV, "XDG_CACHE_HOME": cache_home}
    env.pop("NORMISTRAL_COMPILE_CACHE", None)  # the default: on
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    home = str(tmp_path_factory.mktemp("serve_cache"))
    proc, base, log = start_serve(tiny_dir, os.path.join(home, "server.log"), "--max-num-seqs", "4",
                                  "--max-model-len", "256", "--kv-cache-memory", POOL, "--page-size", str(PAGE),
                                  "--dtype", "float32", "--served-model-name", "tiny", "--prefill-chunk", "16",
                                  env=_env(home))
    log.seek(0)
    yield base, log.read(), home
    stop_serve(proc, log)


def _metrics(base) -> dict:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^normistral_(\w+) (\S+)$", text, re.M)}


def _hf_greedy(hf_model, ids, max_new):
    ids = torch.as_tensor(np.asarray(ids)[None])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                pad_token_id=3)
    return out[0, ids.shape[1]:].tolist()


def test_serve_with_the_pool_flags(server, tiny_dir, hf_model):
    import transformers

    base, announced, home = server
    assert f"{(1 << 20) // PAGE_BYTES} pages of {PAGE} tokens" in announced, announced
    assert re.search(r"normistral serve: \d+ programs ready in \S+ s \(\d+ compilations, 0 from the persistent "
                     r"cache\)", announced), announced  # a fresh cache directory: everything compiled, then kept
    assert os.listdir(os.path.join(home, "normistral", "jax"))  # the programs written to the persistent cache
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    prompt = "Engelsk: The weather is nice today. Where is the train station?\nBokmål:"  # more than one page
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    ids = tok(prompt)["input_ids"]
    assert len(ids) > PAGE
    assert first.choices[0].text == again.choices[0].text == tok.decode(_hf_greedy(hf_model, ids, 8))
    m = _metrics(base)
    assert m["kv_pages_total"] == (1 << 20) // PAGE_BYTES
    assert m["prefix_hit_requests_total"] >= 1 and m["prefix_hit_tokens_total"] >= PAGE  # the second one reused pages
    assert "Traceback" not in announced


@pytest.fixture(scope="module")
def weightless_dir(tiny_dir, tmp_path_factory):
    """tiny_dir without its weights: a command that got as far as loading them would fail on that instead."""
    path = tmp_path_factory.mktemp("weightless") / "tiny"
    shutil.copytree(tiny_dir, path, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    return str(path)


@pytest.mark.parametrize("command, flags, env, message", [
    ("serve", ["--kv-cache-memory", "0"], {}, "argument --kv-cache-memory: expected bytes (e.g. 4GiB, 512MiB, "
                                              "123456) or a fraction of free memory in (0, 1], got '0'"),
    ("serve", ["--kv-cache-memory", "1.5"], {}, "argument --kv-cache-memory: expected bytes"),
    ("serve", ["--slots", "0"], {}, "argument --max-num-seqs/--slots: must be a positive integer, got 0"),
    ("serve", ["--page-size", "0"], {}, "argument --page-size: must be a positive integer, got 0"),
    ("serve", ["--kv-cache-memory", "64KiB", "--max-model-len", "256"], {},
     f"--kv-cache-memory 65536: {65536 // PAGE_BYTES} pages of 16 tokens (65536 bytes at {PAGE_BYTES} bytes a page) "
     "cannot hold one sequence of --max-model-len 256 (16 pages)"),
    ("serve", ["--max-num-seqs", "100", "--kv-cache-memory", POOL, "--max-model-len", "256"], {},
     "--max-num-seqs 100: more sequences than the pool's 64 pages"),
    ("serve", ["--kv-cache-memory", "1000TiB"], {}, "of host memory free"),
    ("serve", [], {"NORMISTRAL_COMPILE_CACHE": "yes"}, "NORMISTRAL_COMPILE_CACHE='yes': expected 0 (off) or 1 (on)"),
    ("generate", ["--batch-size", "100", "--kv-cache-memory", POOL, "--max-model-len", "256"], {},
     "--batch-size 100: more sequences than the pool's 64 pages"),
    ("generate", ["--max-model-len", "513"], {}, "--max-model-len 513: must be in [2, 512] (the model's context)"),
])
def test_bad_pool_flags_are_refused_before_the_model_loads(weightless_dir, tmp_path, command, flags, env, message):
    args = ["--prompt", "Hei"] if command == "generate" else ["--port", "0"]
    r = subprocess.run([sys.executable, "-m", "normistral", command, weightless_dir, "--dtype", "float32", *args,
                        *flags], cwd=ROOT, env=_env(str(tmp_path), **env), capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("normistral: error: ") and message in last, (flags, r.stderr)
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "normistral")  # no cache directory made for a refused command


def _generate(tiny_dir, home, *flags):
    cmd = [sys.executable, "-m", "normistral", "generate", tiny_dir, "--dtype", "float32", "--batch-size", "2",
           "--max-model-len", "128", "--max-new-tokens", "6", "--prefill-chunk", "16", "--prompt", "Hei på deg",
           "Engelsk: I like cheese.", *flags]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    found = WARMED.search(r.stderr)
    assert found, r.stderr[-3000:]
    return r.stdout, [int(x) for x in found.groups()]


def test_a_second_generate_process_compiles_nothing_new(tiny_dir, tmp_path):
    home = str(tmp_path)
    cache = os.path.join(home, "normistral", "jax")
    out1, (programs, compiled1, hits1) = _generate(tiny_dir, home)
    entries = sorted(os.listdir(cache))
    assert programs >= 2 and compiled1 >= programs and hits1 == 0 and len(entries) >= programs
    out2, (_, compiled2, hits2) = _generate(tiny_dir, home)
    assert out2 == out1
    assert compiled2 == hits2 == compiled1  # every warm-up program came from the persistent cache ...
    assert sorted(os.listdir(cache)) == entries  # ... and the whole run compiled (so wrote) nothing new


def test_the_first_generate_call_over_128_prompts_compiles_nothing_after_load(tiny_dir):
    from inference.generator import Generator
    from jaxmodel.compile_cache import CompileCount

    gen = Generator.from_pretrained(tiny_dir, dtype="float32", slots=8, max_model_len=128, prefill_chunk=16)
    engine, compiles = gen.engine, gen.engine.compiles
    assert compiles >= 2  # the load compiled the engine's programs
    sentences = ["I like cheese.", "The weather is nice today.", "Where is the train station?", "Hei på deg."]
    prompts = [f"{sentences[i % 4]} ({i})" for i in range(128)]
    count = CompileCount()
    out = gen.generate(prompts, template="Engelsk: {0}\nBokmål:", max_new_tokens=8, stop="\n")
    assert len(out) == 128 and all(isinstance(o, str) for o in out)
    assert count.compiled == 0 and gen.engine is engine and engine.compiles == compiles
