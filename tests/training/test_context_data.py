"""The data reader under context parallelism (8 simulated CPU devices): what each process reads is the rows x
sequence columns its devices hold (`batch_part`, from the batch's sharding), the parts of all processes tile
the global batch exactly and equal the unsplit batch, each process reads only its share (plus the one column
after each of its column runs: the next token is a target), and `put_batch` places every device's slice."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxmodel.context_parallel import unbalance
from jaxmodel.sharding import make_mesh
from training import config as train_config
from training import step as steps_lib
from training.data import PackedDataset

B, T, ROWS, VOCAB = 8, 64, 40, 256
KEYS = steps_lib.BATCH_KEYS


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A prepared directory written by hand: 3 shards, documents of random lengths packed across the rows'
    context chunks (and cut at row ends), padding at some row ends."""
    out = tmp_path_factory.mktemp("context-data")
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, VOCAB, size=(ROWS, T)).astype(np.int32)
    seg, pos = np.zeros((ROWS, T), np.int32), np.zeros((ROWS, T), np.int32)
    for r in range(ROWS):
        start, doc, end = 0, 1, T - int(rng.integers(0, 6))
        while start < end:
            n = min(int(rng.integers(3, T // 2)), end - start)
            seg[r, start:start + n], pos[r, start:start + n] = doc, np.arange(n)
            start, doc = start + n, doc + 1
    tokens[seg == 0] = 0
    shards, first = [], 0
    for k, rows in enumerate((16, 16, 8)):
        names = {}
        for name, array in (("tokens", tokens), ("segment_ids", seg), ("positions", pos)):
            names[name] = f"unit-000000-{k:03d}.{name}.npy"
            np.save(out / names[name], array[first:first + rows])
        shards.append({**names, "rows": rows})
        first += rows
    index = {"format": 1, "seq_len": T, "num_rows": ROWS, "vocab_size": VOCAB, "max_token_id": VOCAB - 1,
             "tokenizer": {"name": "t", "path": "t", "bos_id": 1, "eos_id": 2, "pad_id": 0},
             "sources": [{"name": "s", "path": "s", "weight": 1.0, "documents": 1, "tokens": 1, "rows": [0, ROWS]}],
             "shards": shards}
    (out / "index.json").write_text(json.dumps(index))
    return PackedDataset.open(str(out))


def _context_outer_mesh(fsdp, context):
    """fsdp x context with the context axis outermost in device order: with 2 processes of 4 devices, each
    process holds one context shard of every sequence (what make_mesh avoids but a mesh may be)."""
    grid = np.array(jax.devices()).reshape(context, fsdp).T
    return Mesh(grid, ("fsdp", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


MESHES = {  # name -> mesh factory; shapes are (data, fsdp, tensor, context)
    "context2_fsdp4": lambda: make_mesh((1, 4, 1, 2)),
    "context4_fsdp2": lambda: make_mesh((1, 2, 1, 4)),
    "context8": lambda: make_mesh((1, 1, 1, 8)),
    "context2_data2_fsdp2": lambda: make_mesh((2, 2, 1, 2)),
    "context4_data2": lambda: make_mesh((2, 1, 1, 4)),
    "context2_outer_fsdp4": lambda: _context_outer_mesh(4, 2),
    "context8_outer": lambda: _context_outer_mesh(1, 8),
}


def _sharding(mesh):
    run = train_config.load({"_path": "test.yaml", "model": {"preset": "tiny", "vocab_size": VOCAB},
                             "train": {"steps": 1, "global_batch_size": B, "seq_len": T}})
    return steps_lib.setup(run, mesh)


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize("name", sorted(MESHES))
def test_process_parts_tile_the_batch_and_read_only_their_share(dataset, name, processes):
    ts = _sharding(MESHES[name]())
    devices = list(ts.mesh.devices.flat)
    by_process = [set(jax.devices()[p * 8 // processes:(p + 1) * 8 // processes]) for p in range(processes)]
    step = 3
    whole = dataset.batch(step, global_batch_size=B, seed=5)
    canvas = {k: np.full((B, T), -1, np.int64) for k in KEYS}
    covered = np.zeros((B, T), np.int64)
    for local in by_process:
        assert local <= set(devices)
        part = steps_lib.batch_part(ts.batch_sharding, (B, T), devices=local)
        before = dataset.bytes_read
        got = dataset.batch(step, global_batch_size=B, rows=part.rows, columns=part.columns, seed=5)
        read = dataset.bytes_read - before
        # Its share: 1 / processes of the batch, and the bytes of exactly its rows x (columns + the column after
        # each run, whose token is the last one's target): 3 int32 arrays.
        assert part.shape[0] * part.shape[1] == B * T // processes
        following = np.union1d(part.columns, np.minimum(part.columns + 1, T - 1))
        runs = 1 + int(np.sum(np.diff(part.columns) != 1))
        assert len(following) <= len(part.columns) + runs
        assert read == part.shape[0] * len(following) * 3 * 4
        for k in KEYS:
            assert got[k].shape == part.shape
            canvas[k][np.ix_(part.rows, part.columns)] = got[k]
        covered[np.ix_(part.rows, part.columns)] += 1
    np.testing.assert_array_equal(covered, 1)  # every token exactly once: no gap, no overlap
    for k in KEYS:
        np.testing.assert_array_equal(canvas[k], whole[k], err_msg=k)


def test_spanning_context_reads_the_two_mirrored_chunks_of_each_sequence(dataset):
    """Context 8 over 2 processes: process 0 holds context shards 0-3, i.e. chunks 0-3 and 12-15 of 16."""
    ts = _sharding(make_mesh((1, 1, 1, 8)))
    part = steps_lib.batch_part(ts.batch_sharding, (B, T), devices=jax.devices()[:4])
    chunk = T // 16
    np.testing.assert_array_equal(part.rows, np.arange(B))
    np.testing.assert_array_equal(part.columns, np.r_[0:4 * chunk, 12 * chunk:T])


@pytest.mark.parametrize("name", ["context2_fsdp4", "context8", "context2_outer_fsdp4"])
def test_put_batch_places_each_devices_slice_in_the_balanced_order(dataset, name):
    ts = _sharding(MESHES[name]())
    whole = dataset.batch(1, global_batch_size=B)
    arrays = steps_lib.put_batch(ts, whole)
    context = dict(ts.mesh.shape).get("context", 1)
    for k in KEYS:
        np.testing.assert_array_equal(unbalance(np.asarray(arrays[k]), context), whole[k], err_msg=k)
        for shard in arrays[k].addressable_shards:  # each device got its own slice of the balanced batch
            assert shard.data.shape == (B // dict(ts.mesh.shape).get("fsdp", 1), T // context)


def test_put_batch_refuses_a_part_of_another_shape(dataset):
    ts = _sharding(make_mesh((1, 4, 1, 2)))
    half = {k: v[:4] for k, v in dataset.batch(0, global_batch_size=B).items()}
    with pytest.raises(ValueError, match=r"batch input_ids: shape \[4, 64\], this process's part of the \[8, 64\] "
                                         r"batch is \[8, 64\]"):
        steps_lib.put_batch(ts, half)


def test_gcs_data_gives_the_same_parts_with_column_range_reads(dataset, gcs_bucket):
    """On gs:// a part is fetched by range reads of its column runs only: the same arrays, the same bytes."""
    from jaxmodel import storage

    remote = f"{gcs_bucket}/context-data"
    with storage.atomic_directory(remote) as out:
        storage.upload_dir(dataset.directory, out)
    ds = PackedDataset.open(remote)
    ts = _sharding(make_mesh((1, 1, 1, 8)))
    for local in (jax.devices()[:4], jax.devices()[4:]):
        part = steps_lib.batch_part(ts.batch_sharding, (B, T), devices=local)
        before = (dataset.bytes_read, ds.bytes_read)
        a = dataset.batch(2, global_batch_size=B, rows=part.rows, columns=part.columns)
        b = ds.batch(2, global_batch_size=B, rows=part.rows, columns=part.columns)
        assert all(np.array_equal(a[k], b[k]) for k in KEYS)
        assert ds.bytes_read - before[1] == dataset.bytes_read - before[0] < B * T * 3 * 4 * 0.6
