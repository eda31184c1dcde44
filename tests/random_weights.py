"""A Hugging Face directory of random float32 weights written straight with safetensors (no torch): for
tests that need only shapes and bytes (import-hf, interruptions), not a model worth running."""

import json
import os

import numpy as np


def write_random_hf(path, config, seed: int = 0) -> str:
    """PATH/{model.safetensors, config.json} for `config` (a MistralConfig); PATH must exist."""
    from safetensors.numpy import save_file

    from jaxmodel.convert import expected_hf_tensors

    rng = np.random.default_rng(seed)
    tensors = {name: rng.standard_normal(t.hf_shape, dtype=np.float32) * 0.02
               for name, t in expected_hf_tensors(config).items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    return str(path)
