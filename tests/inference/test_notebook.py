"""The Colab notebook runs end to end, loading its model by hub id from a hub cache laid out by hand.

The tiny checkpoint sits in a temporary HF_HOME under the notebook's own id (`norallm/normistral-11b-long`),
with HF_HUB_OFFLINE=1: the notebook's code is run unchanged (tests/notebook_runner.py skips only the
`# colab-only` install cell), int8 weights as it defaults to; its Serve section's port comes from
NORMISTRAL_PORT. Its fine-tuning section (QLoRA over an int4 base on translation pairs: prepare-data with a
template, train, export-lora, generate with the adapter; 10 steps here, NORMISTRAL_FT_STEPS) runs on the same
tiny model: the loss falls, the exported adapter loads in the real PEFT onto transformers' model and changes
its logits, and the fine-tuned translations differ from the base model's. tests/test_wheel.py runs it again
from a wheel installed into a fresh virtual environment.
"""

import json
import os
import socket

import numpy as np

from tests.hub_cache import make_hub_cache
from tests.notebook_runner import code_cells, run_notebook

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", "colab_inference.ipynb")


def _peft_changes_logits(base_dir, adapter_dir) -> float:
    """Max |logit change| the adapter makes when the real PEFT loads it onto transformers' model."""
    import peft
    import torch
    import transformers

    ids = torch.as_tensor(np.random.default_rng(0).integers(4, 200, size=(1, 16)))
    hf = transformers.MistralForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        base = hf(ids).logits.numpy()
        tuned = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()(ids).logits.numpy()
    return float(np.abs(tuned - base).max())


def test_notebook_translates_a_batch_by_hub_id_serves_and_fine_tunes(tiny_dir, tmp_path, monkeypatch):
    make_hub_cache(str(tmp_path), "norallm/normistral-11b-long", tiny_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("NORMISTRAL_MODEL", raising=False)
    monkeypatch.delenv("NORMISTRAL_QUANTIZE", raising=False)
    monkeypatch.setenv("NORMISTRAL_FT_STEPS", "10")  # the notebook's 30 steps, cut to keep the suite fast
    with socket.socket() as s:  # the Serve section's port
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("NORMISTRAL_PORT", str(s.getsockname()[1]))
    assert len(list(code_cells(NOTEBOOK))) >= 4
    namespace = run_notebook(NOTEBOOK)
    assert namespace["MODEL"] == "norallm/normistral-11b-long" and namespace["QUANTIZE"] == "int8"
    assert len(namespace["translations"]) == len(namespace["sentences"])
    assert isinstance(namespace["served"], str) and namespace["streamed"] == namespace["served"]
    assert namespace["served"].strip() == namespace["translations"][1]  # the server and Generator agree

    # Fine-tuning: real prompt/completion data, a falling loss, an adapter PEFT reads, different translations.
    work = namespace["work"]
    index = json.load(open(os.path.join(work, "data", "index.json")))
    assert index["num_rows"] >= 1 and index["format"] == 2  # format 2: prompt/completion records, loss-masked
    losses = namespace["losses"]
    assert len(losses) == namespace["FT_STEPS"] == 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    config = json.load(open(os.path.join(namespace["ADAPTER"], "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], len(config["target_modules"])) == (16, 32, 7)
    assert _peft_changes_logits(tiny_dir, namespace["ADAPTER"]) > 1e-2
    assert type(namespace["tuned"].model.lm_head[...]).__name__ == "QArray"  # merged, then quantized to int8
    tuned = namespace["tuned_translations"]
    assert len(tuned) == len(namespace["sentences"]) and tuned != namespace["translations"]
