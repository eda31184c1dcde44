"""The Quickstart's main job (`make demo`) end to end: the same function the command runs."""

import json
import os

from normistral_demo import run_demo


def test_demo_runs_end_to_end_with_falling_loss_real_parity_and_memorized_translations(tmp_path):
    result = run_demo(str(tmp_path / "demo"), steps=300)
    assert result["final_step"] == 300
    assert result["loss_last10"] < result["loss_first10"] - 3.0, result
    assert result["parity_max_abs_logit_diff"] <= 1e-4  # measured against transformers, not assumed
    assert result["translations_exact"] >= 4, result  # memorized pairs from the bundled corpus
    assert os.path.getsize(result["loss_curve"]) > 10_000
    with open(tmp_path / "demo" / "run" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 301))
    exported = tmp_path / "demo" / "run" / "hf"
    assert (exported / "config.json").exists() and (exported / "tokenizer.json").exists()
