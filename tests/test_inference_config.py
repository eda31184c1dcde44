"""One inference config (inference/config.py `InferenceConfig`): the YAML `inference:` section that
`serve --config`, `generate --config` and `compile-check` read, with flags given explicitly overriding it.

Unknown keys and bad values are one line naming FILE:LINE (exit 2, no traceback, before any model load); every
shipped inference config parses into the engine's settings; one real `normistral serve --config` process on
the tiny model answers an OpenAI client, with the config's settings and a flag's override in its banner."""

import dataclasses
import glob
import os

import pytest

from jaxmodel.cli import DEFAULT_GROUP_SIZE
from tests.inference.conftest import tiny_dir  # noqa: F401 (a session fixture: the tiny model with its tokenizer)
from tests.test_cli_errors import _fails, _yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "normistral-11b-long-infer-*.yaml")))


def _merged(command: str, *argv: str):
    """(tree, InferenceConfig) exactly as `command`'s handler builds them (parser, then read_config)."""
    import normistral
    from inference.cli import GENERATE_FLAGS
    from inference.config import read_config
    from inference.serve_cli import SERVE_FLAGS

    extra = ["--prompt", "hi"] if command == "generate" else []
    args = normistral.build_parser().parse_args([command, "MODEL", *extra, *argv])
    return read_config(args, GENERATE_FLAGS if command == "generate" else SERVE_FLAGS)


def test_field_choices_agree_with_the_modules_that_use_them():
    from inference.config import KV_CACHE_DTYPES, QUANTIZE_MODES, InferenceConfig
    from inference.quantize import DEFAULT_GROUP_SIZE as QUANT_GROUP_SIZE
    from inference.quantize import MODES
    from jaxmodel.kv_cache import KV_DTYPES

    assert QUANTIZE_MODES == MODES and tuple(KV_CACHE_DTYPES) == tuple(KV_DTYPES)
    assert InferenceConfig().group_size == DEFAULT_GROUP_SIZE == QUANT_GROUP_SIZE


@pytest.fixture
def sigterm_kept():
    """serve (in process here) installs its SIGTERM handler; pytest's is put back afterwards."""
    import signal

    kept = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, kept)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_unknown_key_is_one_line_naming_file_and_line(tmp_path, capfd, sigterm_kept, command):
    config = _yaml(tmp_path, "inference:\n  max_num_seqs: 4\n  max_num_seq: 4\n")
    argv = [command, "no/such/model", "--config", config] + (["--prompt", "hi"] if command == "generate" else [])
    if command == "serve":  # serve checks its model directory first: give it one that exists
        argv[1] = str(tmp_path)
        (tmp_path / "config.json").write_text("{}")
    last = _fails(argv, capfd, ["run.yaml:3: inference.max_num_seq is not a known option", "max_num_seqs"])
    assert "no/such/model" not in last


def test_a_bad_value_names_its_line(tmp_path, capfd):
    config = _yaml(tmp_path, "inference:\n  max_queue: 0\n")
    _fails(["generate", "no/such/model", "--prompt", "hi", "--config", config], capfd,
           ["run.yaml:2:", "max_queue must be a positive integer, got 0"])


def test_flags_given_override_the_config_and_the_rest_come_from_it(tmp_path):
    config = _yaml(tmp_path, "inference:\n  max_num_seqs: 6\n  max_model_len: 300\n  prefill_chunk: 32\n"
                             "  page_size: 8\n  max_queue: 9\n  kv_cache_memory: 2MiB\n  quantize: int8\n")
    _, cfg = _merged("serve", "--config", config, "--max-model-len", "128", "--no-prefix-caching")
    assert (cfg.max_model_len, cfg.prefix_caching) == (128, False)  # the flags
    assert (cfg.seqs, cfg.prefill_chunk, cfg.page_size, cfg.max_queue, cfg.kv_cache_memory, cfg.quantize) == \
        (6, 32, 8, 9, 2 * 2**20, "int8")  # the config
    _, cfg = _merged("generate", "--config", config, "--batch-size", "3", "--quantize", "int4", "--group-size", "64")
    assert (cfg.seqs, cfg.quantize, cfg.group_size, cfg.max_model_len) == (3, "int4", 64, 300)


def test_without_config_the_defaults_are_the_flags_old_defaults():
    for command, expected in (("serve", (8, 256, 256, 16, True)), ("generate", (8, 256, 256, 16, True))):
        _, cfg = _merged(command)
        assert (cfg.seqs, cfg.prefill_chunk, cfg.max_queue, cfg.page_size, cfg.prefix_caching) == expected
        assert (cfg.max_new_tokens, cfg.group_size, cfg.quantize, cfg.max_model_len) == (64, DEFAULT_GROUP_SIZE, None,
                                                                                        None)


def test_group_size_pairs_with_the_quantize_the_config_gives(tmp_path, capfd):
    int4 = os.path.join(ROOT, "configs", "normistral-11b-long-infer-8gb-int4.yaml")
    _, cfg = _merged("generate", "--config", int4, "--group-size", "64")
    assert (cfg.quantize, cfg.group_size) == ("int4", 64)
    bf16 = os.path.join(ROOT, "configs", "normistral-11b-long-infer-v6e-1.yaml")
    _fails(["generate", "no/such/model", "--prompt", "hi", "--config", bf16, "--group-size", "64"], capfd,
           "--group-size needs --quantize int4")


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_each_shipped_inference_config_gives_serve_and_compile_check_their_settings(path):
    """serve --config's engine settings (no model loaded) are the file's; compile-check reads every section."""
    import yaml

    from normistral import _check_sections

    section = yaml.safe_load(open(path, encoding="utf-8"))["inference"]
    tree, cfg = _merged("serve", "--config", path)
    _check_sections(tree)
    assert cfg.seqs == section.get("max_num_seqs", section["batch_size"])
    for key, value in section.items():
        if key != "kv_cache_memory":  # "3GiB" is read as bytes
            assert getattr(cfg, key) == value, key
    assert set(section) <= {f.name for f in dataclasses.fields(cfg)}


def test_serve_with_a_shipped_config_answers_an_openai_client(tiny_dir, tmp_path):  # noqa: F811
    """A real server: v6e-1's section (32 sequences, 512-token prefill chunks, 16-token pages) on the tiny
    model, with the context and the pool given as flags (the file's are the 11B model's)."""
    import openai

    from tests.inference.serving import ANNOUNCED, start_serve, stop_serve

    config = os.path.join("configs", "normistral-11b-long-infer-v6e-1.yaml")
    proc, base, log = start_serve(tiny_dir, str(tmp_path / "serve.log"), "--config", config, "--max-model-len",
                                  "128", "--kv-cache-memory", "2MiB", "--dtype", "float32", "--no-warmup",
                                  "--served-model-name", "tiny")
    try:
        log.seek(0)
        banner = ANNOUNCED.search(log.read()).string
        assert "up to 32 sequences of up to 128 tokens" in banner and "pages of 16 tokens" in banner, banner
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        reply = client.completions.create(model="tiny", prompt="Hei på deg", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4 or reply.choices[0].finish_reason == "stop"
        assert reply.usage.prompt_tokens > 0 and isinstance(reply.choices[0].text, str)
    finally:
        stop_serve(proc, log)
    assert proc.returncode == 0


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_serve_and_generate_share_the_lowest_prefill_chunk(tiny_dir, capfd, sigterm_kept, command):  # noqa: F811
    argv = [command, tiny_dir, "--prefill-chunk", "8"] + (["--prompt", "hi"] if command == "generate" else [])
    _fails(argv, capfd, ["--prefill-chunk 8: must be >= 16"])
