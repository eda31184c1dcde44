"""Context parallelism across real processes: `normistral train` as 2 processes x 4 CPU devices on localhost
gives, over 20 steps, the losses of 1 process x 8 devices (fsdp 8) within 1e-6 relative, both with context 2
x fsdp 4 (make_mesh keeps each sequence's context shards on one host: each host reads whole rows) and with
context 8 (every sequence spans both hosts: each host reads only its 8 chunks of each sequence). The packed
bundled corpus has documents crossing the context chunks' and the hosts' boundaries."""

import os

import numpy as np
import pytest

from tests.multihost import CONFIG, losses, train_one, train_two

STEPS = 20
# The hybrid objective on (some steps masked, attended both ways); learning rate 1e-3 as in
# tests/training/test_context_train.py: higher rates let Adam amplify float rounding past 1e-6 by step 20.
RUN = [f"train.steps={STEPS}", f"checkpoint.every={STEPS}", "train.eval_every=0", "train.mntp_probability=0.3",
       "optimizer.learning_rate=0.001"]
SEQ_LEN = 128  # configs/tiny-cpu.yaml


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The bundled corpus, tokenized and packed once in this process (no model, no compile)."""
    from jaxmodel.run_config import load_run_config
    from training.config import load
    from training.train import ensure_data

    root = tmp_path_factory.mktemp("context-multihost")
    run = load(load_run_config(CONFIG, []))
    ensure_data(run, str(root))
    return root, [f"data.dir={root}/data", f"data.tokenizer_dir={root}/tokenizer"]


@pytest.fixture(scope="module")
def reference(data):
    work = str(data[0] / "fsdp8")
    train_one(work, RUN + ["mesh.fsdp=8"], data[1])
    return losses(work)


def test_documents_cross_the_context_chunks_and_the_hosts(data):
    """Context 8 over 2 hosts: process 0 holds tokens [0, 32) and [96, 128) of each sequence; documents run
    across those boundaries (and the 8-token chunk boundaries) in the batches the runs train on."""
    from training.data import PackedDataset

    ds = PackedDataset.open(str(data[0] / "data"))
    seg = np.concatenate([ds.batch(s, global_batch_size=8)["segment_ids"] for s in range(STEPS)])
    crossing = (seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] != 0)  # [rows, boundary c between c and c+1]
    assert crossing[:, 31].sum() > 10 and crossing[:, 95].sum() > 10  # host boundaries
    assert (crossing[:, 7::8].sum(axis=0) > 10).all()  # every 8-token chunk boundary


@pytest.mark.parametrize(("mesh", "reads"), [
    (["mesh.fsdp=4", "mesh.context=2"], "reads 4 rows x 128 sequence columns"),  # context within a host
    (["mesh.fsdp=1", "mesh.context=8"], "reads 8 rows x 64 sequence columns"),  # context across both hosts
])
def test_two_processes_with_context_train_the_losses_of_fsdp8(data, reference, mesh, reads, tmp_path):
    work = str(tmp_path / "two")
    procs = train_two(work, RUN + mesh, data[1])
    stderr = procs[0].outputs[1]
    assert reads in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and "Traceback" not in procs[1].outputs[1]
    got = losses(work)
    assert sorted(got) == sorted(reference) == list(range(1, STEPS + 1))  # process 0 wrote one line per step
    assert reference[STEPS] < reference[1]  # it trains
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                               [reference[s] for s in range(1, STEPS + 1)], rtol=1e-6, atol=0)
    assert os.path.isdir(os.path.join(work, "checkpoints", str(STEPS)))
