"""The optimizer pieces and the jitted train step on 8 simulated devices: decay mask, schedules, sharded
state, gradient accumulation, skipped non-finite steps."""

import jax
import numpy as np
import pytest

from jaxmodel.config import ConfigError
from jaxmodel.model import abstract_model
from jaxmodel.sharding import make_mesh
from training import config as train_config
from training import step as steps_lib
from training.optim import decay_mask, learning_rate_schedule

VOCAB = 256


def _run(**train):
    tree = {"_path": "test.yaml", "model": {"preset": "tiny", "vocab_size": VOCAB, "num_hidden_layers": 2},
            "train": {"steps": 10, "global_batch_size": 8, "seq_len": 32, "loss_chunk": 16, **train},
            "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant"}}
    return train_config.load(tree)


def _batch(seed=0, b=8, t=32):
    rng = np.random.default_rng(seed)
    ids = rng.integers(16, VOCAB, size=(b, t + 1))
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2  # two documents per row
    loss_mask = np.ones((b, t), np.float32)
    loss_mask[:, t // 2 - 1] = 0  # no loss across the document boundary
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": seg,
            "positions": np.broadcast_to(pos, (b, t)), "loss_mask": loss_mask}


def _one_step(run, batch, mesh_shape=(1, 8, 1)):
    ts = steps_lib.setup(run, make_mesh(mesh_shape))
    state = steps_lib.init_state(ts)
    before = jax.device_get(state)
    with jax.set_mesh(ts.mesh):
        state, metrics = steps_lib.make_train_step(ts)(state, steps_lib.put_batch(ts, batch))
    return before, jax.device_get(state), jax.device_get(metrics), ts


def test_weight_decay_skips_norms_and_optionally_embeddings():
    model = abstract_model(_run().model)
    mask = decay_mask(model)
    assert mask["norm"]["weight"] is False and mask["layers"]["input_layernorm"]["weight"] is False
    assert mask["layers"]["self_attn"]["q_proj"] is True and mask["lm_head"] is True
    assert mask["embed_tokens"] is True
    no_emb = decay_mask(model, decay_embeddings=False)
    assert no_emb["embed_tokens"] is False and no_emb["lm_head"] is False
    assert no_emb["layers"]["mlp"]["down_proj"] is True


def test_schedules():
    opt = train_config.OptimizerConfig
    constant = learning_rate_schedule(opt(learning_rate=1.0, schedule="constant"), 100)
    assert float(constant(0)) == 1.0 and float(constant(99)) == 1.0  # zero warmup: the peak at once
    warm = learning_rate_schedule(opt(learning_rate=1.0, schedule="constant", warmup_steps=10), 100)
    assert float(warm(5)) == pytest.approx(0.5) and float(warm(50)) == 1.0
    cosine = learning_rate_schedule(opt(learning_rate=1.0, schedule="cosine", warmup_steps=10, end_lr_ratio=0.1), 110)
    assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(110)) == pytest.approx(0.1)
    assert float(cosine(60)) == pytest.approx(0.55, abs=1e-6)
    wsd = learning_rate_schedule(opt(learning_rate=1.0, schedule="wsd", warmup_steps=10, decay_steps=20,
                                     end_lr_ratio=0.0), 100)
    assert [float(wsd(s)) for s in (5, 10, 50, 80, 90, 100)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 0.5, 0.0])


def test_bad_sections_are_one_line_errors():
    with pytest.raises(ConfigError, match="train.microbatches"):
        train_config.load({"_path": "x.yaml", "model": {"preset": "tiny"},
                           "train": {"global_batch_size": 8, "microbatches": 3}})
    with pytest.raises(ConfigError, match="optimizer.lr is not a known option"):
        train_config.load({"_path": "x.yaml", "model": {"preset": "tiny"}, "optimizer": {"lr": 1}})


def test_optimizer_state_is_sharded_like_the_params():
    ts = steps_lib.setup(_run(), make_mesh((1, 4, 2)))
    sh = ts.state_shardings
    adam = sh["opt_state"][1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    for moments in (adam.mu, adam.nu):
        assert jax.tree.map(lambda s: s.spec, moments) == jax.tree.map(lambda s: s.spec, sh["params"])
    assert tuple(sh["params"]["layers"]["self_attn"]["q_proj"].spec) == (None, "fsdp", "tensor", None)


def test_accumulated_microbatches_equal_one_big_batch():
    """Loss and gradients of the step's scan over 4 microbatches equal the whole batch at once."""
    ts1 = steps_lib.setup(_run(microbatches=1), make_mesh((1, 8, 1)))
    ts4 = steps_lib.setup(_run(microbatches=4), make_mesh((1, 8, 1)))
    state = steps_lib.init_state(ts1)
    batch = steps_lib.put_batch(ts1, _batch())
    key = steps_lib.step_key(state)
    with jax.set_mesh(ts1.mesh):
        loss1, n1, g1, _ = jax.jit(steps_lib.make_loss_and_grads(ts1))(state["params"], batch, key)
        loss4, n4, g4, _ = jax.jit(steps_lib.make_loss_and_grads(ts4))(state["params"], batch, key)
    assert float(n1) == float(n4) == 8 * 31
    np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_non_finite_batch_is_skipped_with_state_unchanged():
    batch = _batch()
    batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)  # a poisoned batch: NaN loss and gradients
    before, after, metrics, _ = _one_step(_run(), batch)
    assert not metrics["finite"] and np.isnan(metrics["loss"])
    assert int(after["step"]) == 1 and int(after["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                    jax.tree.leaves(after["params"]) + jax.tree.leaves(after["opt_state"])):
        np.testing.assert_array_equal(a, b)


def test_mntp_step_runs_bidirectional_and_counts_only_masked_targets():
    _, after, metrics, _ = _one_step(_run(mntp_probability=1.0), _batch())
    assert metrics["mntp"] and metrics["finite"]
    assert 0 < metrics["loss_tokens"] < 8 * 31 / 3  # about 1/6 of the tokens carry a loss
    assert int(after["skipped"]) == 0


@pytest.mark.parametrize("name", ["tiny-cpu", "normistral-11b-long-32k-v5p", "normistral-11b-long-8k-gpu"])
def test_shipped_configs_load_and_give_an_abstract_11b_state(name):
    """Every config in configs/ parses; the train state's shapes come from eval_shape (no memory)."""
    import os

    from jaxmodel.run_config import load_run_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = train_config.load(load_run_config(os.path.join(root, "configs", f"{name}.yaml")))
    ts = steps_lib.setup(run, make_mesh(run.mesh.__class__(data=1, fsdp=-1, tensor=1)))
    state = steps_lib.abstract_state(ts)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    adam = state["opt_state"][1][0]
    assert n_params == run.model.num_params()
    assert sum(x.size for x in jax.tree.leaves(adam.mu)) == n_params
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["params"]))  # float32 master weights
    if name != "tiny-cpu":
        assert run.model.num_params() == 11_429_893_120 and run.model.dtype == "bfloat16"
        expected = {"normistral-11b-long-32k-v5p": "gs://BUCKET/nm11b-orbax"}.get(name, "/data/normistral-11b-long")
        assert run.init_from == expected and run.model.remat == "full"  # the configs' placeholders
        assert run.train.seq_len * run.train.global_batch_size >= 64 * 8192
