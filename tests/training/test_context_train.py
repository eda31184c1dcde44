"""Training with context parallelism on 8 simulated CPU devices: loss and gradients equal the single-device
ones (causal and masked objective, packed documents crossing shard boundaries, xla/flash/splash), a
training run with context 2 x fsdp 4 follows the 1 x 8 one, and `train` refuses a seq_len that 2 x context
does not divide before doing anything."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxmodel.sharding import make_mesh
from training import config as train_config
from training import step as steps_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 256


def _run(seq_len=128, impl="xla", lr=1e-2, remat="none", **train):
    tree = {"_path": "test.yaml",  # the tiny preset scans its layers
            "model": {"preset": "tiny", "vocab_size": VOCAB, "dtype": "float32", "attention_impl": impl,
                      "remat": remat},
            "train": {"steps": 20, "global_batch_size": 8, "seq_len": seq_len, "loss_chunk": 32, **train},
            "optimizer": {"learning_rate": lr, "warmup_steps": 0, "schedule": "constant"}}
    return train_config.load(tree)


def _batch(seed=0, b=8, t=128):
    """Rows packed with documents of random odd lengths (crossing the shard boundaries), padding at the end."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(16, VOCAB, size=(b, t + 1)).astype(np.int32)
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for r in range(b):
        start, doc = 0, 1
        while start < t - 5:
            n = min(int(rng.integers(t // 6, t // 2)) | 1, t - 5 - start)
            seg[r, start:start + n], pos[r, start:start + n] = doc, np.arange(n)
            start, doc = start + n, doc + 1
    loss_mask = ((seg != 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
    loss_mask[:, -1] = 0
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": seg, "positions": pos,
            "loss_mask": loss_mask}


def _loss_and_grads(run, shape, batch, devices=None):
    ts = steps_lib.setup(run, make_mesh(shape, devices=devices))
    state = steps_lib.init_state(ts)
    fn = steps_lib.make_loss_and_grads(ts)
    with jax.set_mesh(ts.mesh):
        loss, _, grads, mntp = jax.jit(fn)(state["params"], steps_lib.put_batch(ts, batch), jax.random.key(3))
    return float(loss), jax.device_get(grads), bool(mntp)


def _assert_grads_close(got, expected):
    flat_got, flat_expected = jax.tree.leaves(got), jax.tree.leaves(expected)
    assert len(flat_got) == len(flat_expected)
    for g, e in zip(flat_got, flat_expected):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("impl", "mntp", "remat", "shapes"), [
    ("xla", 0.0, "none", [(1, 4, 1, 2), (1, 1, 2, 4), (1, 1, 1, 8)]),  # context 2 x fsdp 4, 4 x tensor 2, 8
    # The masked objective (corrupted in sequence order, attended both ways), each layer recomputed.
    ("flash", 1.0, "full", [(1, 1, 2, 4)]),
])
def test_loss_and_gradients_equal_single_device(impl, mntp, remat, shapes):
    run, batch = _run(impl=impl, mntp_probability=mntp, remat=remat), _batch()
    loss, grads, used = _loss_and_grads(run, (1, 1, 1), batch, devices=jax.devices()[:1])
    assert used == bool(mntp)
    for shape in shapes:
        got_loss, got_grads, _ = _loss_and_grads(run, shape, batch)
        assert got_loss == pytest.approx(loss, rel=1e-6), shape
        _assert_grads_close(got_grads, grads)


def test_splash_gradients_equal_single_device():
    """The splash kernel's backward (Pallas interpreter) with its mask tables split over `context`."""
    run, batch = _run(seq_len=256, impl="splash", global_batch_size=2), _batch(b=2, t=256)
    loss, grads, _ = _loss_and_grads(run, (1, 1, 1), batch, devices=jax.devices()[:1])
    got_loss, got_grads, _ = _loss_and_grads(run, (1, 1, 1, 2), batch, devices=jax.devices()[:2])
    assert got_loss == pytest.approx(loss, rel=1e-6)
    _assert_grads_close(got_grads, grads)


def _losses(run, shape, steps):
    ts = steps_lib.setup(run, make_mesh(shape))
    state, step, out = steps_lib.init_state(ts), steps_lib.make_train_step(ts), []
    with jax.set_mesh(ts.mesh):
        for i in range(steps):
            state, metrics = step(state, steps_lib.put_batch(ts, _batch(seed=i % 4)))
            out.append(float(metrics["loss"]))
    return out


def test_twenty_steps_with_context2_fsdp4_equal_fsdp8():
    """20 updates (the hybrid objective on: some steps masked) give the same losses within 1e-6 relative.
    At learning rate 1e-3: at 1e-2 Adam amplifies float rounding until even data 2 x fsdp 4 and fsdp 8 (no
    context) differ by 1% at step 20; at 1e-3 both stay within 1e-7."""
    run = _run(mntp_probability=0.3, lr=1e-3)
    reference = _losses(run, (1, 8, 1), 20)
    got = _losses(run, (1, 4, 1, 2), 20)
    assert reference[-1] < reference[0] - 0.2  # it trains
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=0)


def test_train_refuses_a_seq_len_two_x_context_does_not_divide(tmp_path):
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NORMISTRAL_FAULTS")}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    proc = subprocess.run([sys.executable, "-m", "normistral", "train", "--config",
                           os.path.join(ROOT, "configs", "tiny-cpu.yaml"), "--workdir", str(workdir),
                           "--set", "mesh.context=4", "--set", "train.seq_len=100"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("normistral: error: ") and "train.seq_len=100" in last, last
    assert "2 x context = 8" in last and "multiple of 8" in last, last
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()
