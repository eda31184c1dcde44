"""Checks against the PyTorch reference, used by the demo and the `normistral parity` command.

Inside:
- `make_hf_checkpoint(path, config, seed, dtype)`: a randomly initialized transformers
  `MistralForCausalLM` saved as a Hugging Face directory (the stand-in for the downloaded model, since
  nothing can be fetched from a hub here).
- `compare_logits(hf_dir, jax_dir, ...)` (directories or hub ids): runs transformers (eager attention,
  float32) and our model on the same random tokens at far-out positions and reports the largest
  absolute logit difference.

torch and transformers are imported inside the functions: they are test/demo dependencies only.
"""

from __future__ import annotations

import numpy as np

from jaxmodel.config import MistralConfig


def make_hf_checkpoint(path: str, config: MistralConfig, *, seed: int = 0, dtype: str = "float32") -> None:
    import torch
    import transformers

    hf = config.to_hf()
    hf.pop("architectures"), hf.pop("model_type")
    torch.manual_seed(seed)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**hf))
    model.to(getattr(torch, dtype)).save_pretrained(path)


def hf_logits(hf_dir: str, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.MistralForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model(torch.as_tensor(input_ids), position_ids=torch.as_tensor(positions))
    return out.logits.float().numpy()


def compare_logits(
    hf_dir: str, jax_dir: str, *, batch: int = 2, length: int = 256, offset: int = 30000, seed: int = 0
) -> dict:
    """Max |logit difference| between transformers on hf_dir and our model loaded from jax_dir (float32)."""
    import jax
    from flax import nnx

    from jaxmodel.convert import from_pretrained
    from jaxmodel.hub import resolve_model

    hf_dir, jax_dir = resolve_model(hf_dir), resolve_model(jax_dir)  # hub ids -> their cached snapshots
    config = MistralConfig.from_hf(hf_dir)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, size=(batch, length))
    positions = np.broadcast_to(np.arange(length) + offset, (batch, length)).copy()
    reference = hf_logits(hf_dir, ids, positions)
    with jax.default_matmul_precision("highest"):
        model = from_pretrained(jax_dir, progress=False)
        ours = np.asarray(nnx.jit(lambda m, i, p: m(i, positions=p))(model, ids, positions))
    return {
        "max_abs_logit_diff": float(np.abs(ours - reference).max()),
        "max_abs_logit": float(np.abs(reference).max()),
        "tokens": int(batch * length),
        "position_offset": offset,
    }
