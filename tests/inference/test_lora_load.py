"""LoRA adapters at load and export: `--lora` on generate / serve / eval (`Generator.from_pretrained(lora=)`)
and `export-hf --merge-lora`, against real PEFT on transformers (tiny float32 checkpoint, one adapter with
random non-zero A and B made by peft itself)."""

import json
import shutil

import httpx
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import normistral
from inference import Generator
from jaxmodel import MistralConfig
from jaxmodel.parity import make_hf_checkpoint

from .serving import start_serve, stop_serve

PROMPTS = ["Hei på deg, hvordan", "Engelsk: I like cheese.\nBokmål:"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf(path):
    return transformers.MistralForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                           dtype=torch.float32).eval()


def _peft_adapter(base: str, out: str, seed: int = 5) -> None:
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                             init_lora_weights=False)  # random A and B: the adapter changes the outputs
    peft.get_peft_model(_hf(base), config).save_pretrained(out)


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "adapter")
    _peft_adapter(tiny_dir, out)
    return out


@pytest.fixture(scope="module")
def peft_merged(tiny_dir, adapter, tmp_path_factory):
    """(PEFT's merge_and_unload of the adapter, that model saved with save_pretrained + the tokenizer)."""
    merged = peft.PeftModel.from_pretrained(_hf(tiny_dir), adapter).merge_and_unload().eval()
    out = str(tmp_path_factory.mktemp("lora") / "merged")
    merged.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return merged, out


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 300, size=(2, 16))


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _logits(gen, ids):
    return np.asarray(gen.model(jnp.asarray(ids)))


def _peft_greedy(tiny_dir, adapter, prompt, n):
    """transformers + PeftModel (unmerged), greedy, stopping at EOS: the completion text as generate prints it."""
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    model = peft.PeftModel.from_pretrained(_hf(tiny_dir), adapter).eval()
    ids = torch.as_tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def test_generator_lora_logits_equal_peft_merge_and_unload(tiny_dir, adapter, peft_merged, ids, hf_model):
    gen = Generator.from_pretrained(tiny_dir, dtype=jnp.float32, lora=adapter, warmup=False)
    ours, theirs = _logits(gen, ids), _torch_logits(peft_merged[0], ids)
    assert np.abs(theirs - _torch_logits(hf_model, ids)).max() > 1e-2  # the adapter does change the model
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_int8_serves_the_merged_weights_quantized(tiny_dir, adapter, peft_merged, ids):
    ours = _logits(Generator.from_pretrained(tiny_dir, dtype=jnp.float32, quantize="int8", lora=adapter,
                                             warmup=False), ids)
    peft_then_ours = _logits(Generator.from_pretrained(peft_merged[1], dtype=jnp.float32, quantize="int8",
                                                       warmup=False), ids)
    # A few merged weights differ from PEFT's by 1 ulp (another summation order), which can move an int8
    # rounding by one step: 1e-4, while int8 itself moves these logits by over 1e-2.
    assert np.abs(ours - _torch_logits(peft_merged[0], ids)).max() > 1e-2
    np.testing.assert_allclose(ours, peft_then_ours, atol=1e-4, rtol=0)


def test_generate_cli_lora_gives_peft_greedy_tokens(tiny_dir, adapter, capsys):
    normistral.main(["generate", tiny_dir, "--lora", adapter, "--prompt", *PROMPTS, "--max-new-tokens", "10",
                     "--dtype", "float32", "--batch-size", "2", "--max-model-len", "64"])
    printed = [json.loads(x)["output"] for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    expected = [_peft_greedy(tiny_dir, adapter, p, 10).strip() for p in PROMPTS]
    assert printed == expected
    assert any(expected)  # something was generated to compare


@pytest.mark.parametrize("cli", [True, False])
def test_export_hf_merge_lora_equals_peft_merge_and_unload(tiny_dir, adapter, peft_merged, ids, tmp_path, cli):
    out = str(tmp_path / "exported")
    if cli:
        normistral.main(["export-hf", tiny_dir, out, "--merge-lora", adapter])
    else:  # tiny row blocks: each block's delta from the matching rows of A and columns of B
        from jaxmodel.export import export_hf

        export_hf(tiny_dir, out, merge_lora=adapter, progress=False, block_bytes=4096)
    exported = _hf(out)
    np.testing.assert_allclose(_torch_logits(exported, ids), _torch_logits(peft_merged[0], ids), atol=1e-5, rtol=0)
    merged_state = peft_merged[0].state_dict()
    for name, value in exported.state_dict().items():  # a plain checkpoint: the same tensors as PEFT's merge
        np.testing.assert_allclose(value.numpy(), merged_state[name].numpy(), atol=1e-6, rtol=0, err_msg=name)


def test_serve_lora_answers_with_the_adapted_model(tiny_dir, adapter, tmp_path):
    proc, base, log = start_serve(tiny_dir, str(tmp_path / "serve.log"), "--lora", adapter, "--dtype", "float32",
                                  "--served-model-name", "tiny-lora", "--max-num-seqs", "1", "--max-model-len", "64",
                                  "--no-warmup")
    try:
        reply = httpx.post(base + "/v1/completions", json={"model": "tiny-lora", "prompt": PROMPTS[0], "max_tokens": 10,
                                                          "temperature": 0}, timeout=120)
        assert reply.status_code == 200, reply.text
        text = reply.json()["choices"][0]["text"]
    finally:
        stop_serve(proc, log)
    assert text == _peft_greedy(tiny_dir, adapter, PROMPTS[0], 10)


# -- bad adapters: one line naming --lora DIR, exit 2, before the weights load ------------------------------


@pytest.fixture(scope="module")
def bad_adapters(tiny_dir, adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    other = str(root / "other-base")  # the same vocabulary, another MLP width
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    make_hf_checkpoint(other, MistralConfig.tiny(vocab_size=len(tok), intermediate_size=96), seed=1)
    _peft_adapter(other, str(root / "other-shape"))
    unknown = root / "unknown-target"
    shutil.copytree(adapter, unknown)
    config = json.loads((unknown / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "lm_head"]
    (unknown / "adapter_config.json").write_text(json.dumps(config))
    return {"not-peft": tiny_dir, "other-shape": str(root / "other-shape"), "unknown-target": str(unknown)}


EXPECTED = {"not-peft": "not a PEFT adapter directory (no adapter_config.json)",
            "other-shape": "(an adapter for another base model?)",
            "unknown-target": "unknown LoRA target module 'lm_head'"}


def _one_error_line(capsys, flag, path, case):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"normistral: error: {flag} {path}") and EXPECTED[case] in err[0], err
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_generate_bad_lora_is_one_line_before_the_load(tiny_dir, bad_adapters, tmp_path, capsys, case):
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        normistral.main(["generate", tiny_dir, "--lora", bad_adapters[case], "--prompt", "Hei", "--output", str(out)])
    assert exit_info.value.code == 2
    _one_error_line(capsys, "--lora", bad_adapters[case], case)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_export_hf_bad_merge_lora_leaves_nothing(tiny_dir, bad_adapters, tmp_path, capsys, case):
    with pytest.raises(SystemExit) as exit_info:
        normistral.main(["export-hf", tiny_dir, str(tmp_path / "out"), "--merge-lora", bad_adapters[case]])
    assert exit_info.value.code == 2
    _one_error_line(capsys, "--merge-lora", bad_adapters[case], case)
    assert list(tmp_path.iterdir()) == []


def test_serve_and_eval_bad_lora_exit_2_before_the_load(tiny_dir, bad_adapters, capsys):
    for argv in (["serve", tiny_dir, "--port", "0"], ["eval", tiny_dir, "--tasks", "no_such_task"]):
        with pytest.raises(SystemExit) as exit_info:
            normistral.main([*argv, "--lora", bad_adapters["other-shape"]])
        assert exit_info.value.code == 2
        _one_error_line(capsys, "--lora", bad_adapters["other-shape"], "other-shape")


def test_generator_from_pretrained_names_the_lora_argument(tiny_dir, bad_adapters):
    from inference.generate import GenerateError

    with pytest.raises(GenerateError, match=r"^lora=.*unknown LoRA target module 'lm_head'"):
        Generator.from_pretrained(tiny_dir, lora=bad_adapters["unknown-target"], warmup=False)


def test_lm_eval_model_arg_lora_is_checked_before_the_load(tiny_dir, adapter, bad_adapters, ids):
    from inference.eval_tasks import EvalError
    from inference.lm_eval_adapter import NorMistralLM

    with pytest.raises(EvalError, match=r"^lora=.*\(an adapter for another base model\?\)"):
        NorMistralLM(tiny_dir, lora=bad_adapters["other-shape"], dtype="float32", progress=False)
    lm = NorMistralLM(tiny_dir, lora=adapter, dtype="float32", progress=False)
    merged = Generator.from_pretrained(tiny_dir, dtype=jnp.float32, lora=adapter, warmup=False)
    np.testing.assert_array_equal(np.asarray(lm.generator.model(jnp.asarray(ids))), _logits(merged, ids))
