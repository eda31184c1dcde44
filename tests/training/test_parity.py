"""The train step's loss and gradients against PyTorch: transformers' MistralForCausalLM (eager, float32) on
the same weights, the same packed batch (documents isolated by a 4D mask, positions restarting per
document, padding), and the same masked cross entropy."""

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxmodel.config import MistralConfig
from jaxmodel.parity import make_hf_checkpoint
from jaxmodel.sharding import make_mesh
from jaxmodel.weights import expected_hf_tensors
from training import config as train_config
from training import step as steps_lib
from training.train import initial_state

CONFIG = MistralConfig.tiny(num_hidden_layers=2, vocab_size=512)  # GQA 8:2, head_dim 32 != 128 / 8
B, T = 4, 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("parity") / "hf")
    make_hf_checkpoint(path, CONFIG, seed=3)
    return path


def _packed_batch(seed=0):
    """Rows of 2-3 documents with restarting positions and padding, as training/data.py lays them out."""
    rng = np.random.default_rng(seed)
    ids = np.full((B, T), 3, np.int64)
    seg = np.zeros((B, T), np.int64)
    pos = np.zeros((B, T), np.int64)
    for r, lengths in enumerate([(20, 30, 10), (64,), (40, 17), (5, 25, 30)]):
        t = 0
        for s, n in enumerate(lengths, start=1):
            ids[r, t:t + n] = rng.integers(16, CONFIG.vocab_size, n)
            ids[r, t] = 1
            seg[r, t:t + n], pos[r, t:t + n] = s, np.arange(n)
            t += n
    targets = np.full_like(ids, 3)
    targets[:, :-1] = ids[:, 1:]
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, :-1] = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "targets": targets, "loss_mask": loss_mask}


def _torch_loss_and_grads(path, batch):
    model = transformers.MistralForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                            dtype=torch.float32)
    seg = torch.as_tensor(batch["segment_ids"])
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]  # additive [B, 1, T, T]
    logits = model(torch.as_tensor(batch["input_ids"]), position_ids=torch.as_tensor(batch["positions"]),
                   attention_mask=mask).logits
    weights = torch.as_tensor(batch["loss_mask"])
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CONFIG.vocab_size),
                                                   torch.as_tensor(batch["targets"]).reshape(-1), reduction="none")
    loss = (token_loss * weights.reshape(-1)).sum() / weights.sum()
    loss.backward()
    return loss.item(), {name: p.grad.numpy() for name, p in model.named_parameters()}


def test_loss_and_gradients_match_pytorch(checkpoint):
    batch = _packed_batch()
    tree = {"_path": "parity.yaml", "model": {"init_from": checkpoint, "dtype": "float32", "attention_impl": "xla"},
            "train": {"steps": 1, "global_batch_size": B, "seq_len": T, "loss_chunk": 24}}
    run = train_config.load(tree)
    ts = steps_lib.setup(run, make_mesh((1, 2, 2), devices=jax.devices()[:4]))
    state = initial_state(ts, run)
    with jax.set_mesh(ts.mesh):
        loss, count, grads, _ = jax.jit(steps_lib.make_loss_and_grads(ts))(
            state["params"], steps_lib.put_batch(ts, batch), steps_lib.step_key(state))
    ref_loss, ref_grads = _torch_loss_and_grads(checkpoint, batch)

    assert float(count) == batch["loss_mask"].sum()
    assert abs(float(loss) - ref_loss) <= 1e-4 * abs(ref_loss)
    tensors = expected_hf_tensors(CONFIG)
    checked = 0
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.input_layernorm.weight"):
        t = tensors[name]
        ours = grads
        for key in t.rule.path:
            ours = ours[key]
        ours = np.asarray(ours if t.layer is None else ours[t.layer])
        expected = t.to_jax(ref_grads[name])
        rel = np.abs(ours - expected).max() / np.abs(expected).max()
        assert rel <= 1e-4, f"{name}: relative difference {rel:.2e}"
        checked += 1
    assert checked == 9
