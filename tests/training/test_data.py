"""prepare_data and PackedDataset: packing, determinism, process slices, epochs, mixing, errors, the CLI."""

import json
import os

import numpy as np
import pytest

from tests.training.conftest import CORPUS
from training.data import PackedDataset
from training.documents import DataError, iter_documents
from training.prepare import prepare_data

SEQ_LEN = 64


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two small sources: a .jsonl (short and long documents, one spelling special tokens) and a .txt."""
    root = tmp_path_factory.mktemp("sources")
    nb = list(iter_documents(os.path.join(CORPUS, "nb.jsonl")))
    docs_a = nb[:40] + ["Teksten </s> er ikke slutten, og <s> er ikke starten.", "Kort.",
                        "Et langt dokument. " * 60]
    a = root / "a.jsonl"
    a.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n\n" for d in docs_a), encoding="utf-8")
    nn = [d for d in iter_documents(os.path.join(CORPUS, "nn.jsonl")) if "\n\n" not in d][:30]
    b = root / "b.txt"
    b.write_text("\n\n\n".join(nn) + "\n", encoding="utf-8")
    return {"a": (str(a), docs_a), "b": (str(b), nn)}


@pytest.fixture(scope="module")
def prepared(sources, tokenizer_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared") / "data")
    prepare_data(tokenizer_dir, [sources["a"][0], sources["b"][0]], out, SEQ_LEN, weights=[3, 1],
                 shard_tokens=SEQ_LEN * 7, progress=False)
    return out


def _source_rows(ds, s):
    start, stop = ds.index["sources"][s]["rows"]
    return ds.read_rows(np.arange(start, stop))


def test_index_describes_the_data(prepared, sources, tok):
    with open(os.path.join(prepared, "index.json")) as f:
        index = json.load(f)
    assert index["seq_len"] == SEQ_LEN and index["vocab_size"] == len(tok) == 2048
    assert index["tokenizer"]["name"] == "tok" and index["tokenizer"]["eos_id"] == 2
    assert [s["weight"] for s in index["sources"]] == [0.75, 0.25]
    assert [s["documents"] for s in index["sources"]] == [len(sources["a"][1]), len(sources["b"][1])]
    assert index["sources"][0]["rows"][1] == index["sources"][1]["rows"][0]
    assert sum(s["rows"] for s in index["shards"]) == index["num_rows"] == index["sources"][1]["rows"][1]
    assert len(index["shards"]) > 1 and all(s["rows"] <= 7 for s in index["shards"])
    for shard in index["shards"]:
        arr = np.load(os.path.join(prepared, shard["tokens"]), mmap_mode="r")
        assert arr.dtype == np.int32 and arr.shape == (shard["rows"], SEQ_LEN)
    assert not [n for n in os.listdir(os.path.dirname(prepared)) if ".tmp-" in n]


def test_packing_decodes_back_to_the_documents(prepared, sources, tok):
    ds = PackedDataset.open(prepared)
    for s, key in enumerate(("a", "b")):
        rows = _source_rows(ds, s)
        stream = np.concatenate([t[seg != 0] for t, seg in zip(rows["tokens"], rows["segment_ids"])])
        ends = np.nonzero(stream == tok.eos_token_id)[0]
        pieces = np.split(stream, ends + 1)[:-1]
        assert [tok.decode(p, skip_special_tokens=True) for p in pieces] == sources[key][1]
        assert all(p[0] == tok.bos_token_id and (p == tok.bos_token_id).sum() == 1 for p in pieces)


def test_rows_have_consistent_segments_and_positions(prepared, tok):
    ds = PackedDataset.open(prepared)
    data = ds.read_rows(np.arange(ds.num_rows))
    for tokens, seg, pos in zip(data["tokens"], data["segment_ids"], data["positions"]):
        used = int((seg != 0).sum())
        assert used > 0 and (seg[:used] != 0).all() and (seg[used:] == 0).all()  # padding only at the end
        assert (tokens[used:] == tok.pad_token_id).all() and (pos[used:] == 0).all()
        assert seg[0] == 1 and set(np.diff(seg[:used])) <= {0, 1}  # segments 1, 2, 3, ...
        starts = np.r_[True, seg[1:used] != seg[:used - 1]]
        assert (pos[:used][starts] == 0).all()  # positions restart per document
        assert (np.diff(pos[:used])[~starts[1:]] == 1).all()


def test_long_documents_fill_whole_rows(prepared, sources, tok):
    ds = PackedDataset.open(prepared)
    rows = _source_rows(ds, 0)
    full = [i for i, seg in enumerate(rows["segment_ids"]) if (seg == 1).all()]
    assert full, "the 60-sentence document must span rows"
    for i in full:
        assert (rows["positions"][i] == np.arange(SEQ_LEN)).all()
    short = sum(len(tok(d)["input_ids"]) + 1 <= SEQ_LEN for d in sources["a"][1])
    assert sum(int(seg.max()) for seg in rows["segment_ids"]) >= short  # short documents are one segment each


def test_batch_is_a_pure_function_of_its_arguments(prepared):
    a, b = PackedDataset.open(prepared), PackedDataset.open(prepared)
    for step in (5, 0, 123, 5):
        x, y = a.batch(step, global_batch_size=8, seed=1), b.batch(step, global_batch_size=8, seed=1)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        assert all(v.shape == (8, SEQ_LEN) and v.dtype == np.int32 for v in x.values())
    ids = [tuple(a.row_ids(s, global_batch_size=8, seed=seed)) for s in range(4) for seed in (0, 1)]
    assert len(set(ids)) == len(ids)  # steps and seeds give different batches


def test_targets_and_loss_mask(prepared, tok):
    batch = PackedDataset.open(prepared).batch(2, global_batch_size=16)
    inputs, targets, mask, seg = batch["input_ids"], batch["targets"], batch["loss_mask"], batch["segment_ids"]
    assert np.array_equal(targets[:, :-1], inputs[:, 1:]) and (mask[:, -1] == 0).all()
    assert set(np.unique(mask)) <= {0, 1}
    assert (mask[inputs == tok.eos_token_id] == 0).all()  # no target across a document end
    assert (mask[seg == 0] == 0).all() and (mask[targets == tok.pad_token_id] == 0).all()
    assert mask[targets == tok.eos_token_id].all()  # the model learns to end documents
    assert (mask[:, :-1] == ((seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1]))).all()


@pytest.mark.parametrize("step", [0, 3, 41])
def test_process_slices_make_up_the_global_batch(prepared, step):
    ds = PackedDataset.open(prepared)
    whole = ds.batch(step, global_batch_size=8, seed=7)
    halves = [ds.batch(step, global_batch_size=8, process_index=p, process_count=2, seed=7) for p in range(2)]
    for key in whole:
        assert halves[0][key].shape == (4, SEQ_LEN)
        assert np.array_equal(np.concatenate([h[key] for h in halves]), whole[key])


def test_a_process_reads_only_its_own_rows(prepared):
    ds = PackedDataset.open(prepared)
    touched = set()
    real = ds._array

    class Spy:
        def __init__(self, shard, arr):
            self.shard, self.arr = shard, arr

        def __getitem__(self, local):
            touched.update(int(ds.shard_starts[self.shard] + i) for i in np.atleast_1d(local))
            return self.arr[local]

    ds._array = lambda shard, name: Spy(shard, real(shard, name))
    ds.batch(9, global_batch_size=8, process_index=1, process_count=4)
    mine = set(ds.row_ids(9, global_batch_size=8, process_index=1, process_count=4).tolist())
    assert touched == mine and len(mine) <= 2


def test_every_row_is_visited_once_per_epoch(prepared):
    ds = PackedDataset.open(prepared, weights=[1, 0])  # source a only
    n, batch = int(ds.source_rows[0]), 3
    seen = np.concatenate([ds.row_ids(s, global_batch_size=batch, seed=3) for s in range(-(-2 * n // batch))])
    first, second = seen[:n], seen[n:2 * n]
    assert sorted(first) == sorted(second) == list(range(n))
    assert not np.array_equal(first, second)  # a fresh order each epoch


def test_weights_are_respected_over_many_steps(prepared):
    for weights, expected in ((None, 0.75), ([1, 1], 0.5), ([0.1, 0.9], 0.1)):
        ds = PackedDataset.open(prepared, weights=weights)
        rows = np.concatenate([ds.row_ids(s, global_batch_size=16, seed=0) for s in range(300)])
        share = np.mean(rows < ds.source_rows[0])
        assert abs(share - expected) < 0.01, (weights, share)


def test_preparation_errors_are_one_line(tokenizer_dir, sources, tmp_path):
    from jaxmodel.storage import StorageError

    good = sources["a"][0]
    cases = [
        (StorageError, "missing.jsonl: no such file", [str(tmp_path / "missing.jsonl")], {}),
        (DataError, "seq_len must be an integer >= 2", [good], {"seq_len": 1}),
        (DataError, "2 weights for 1 inputs", [good], {"weights": [1, 2]}),
        (DataError, "weights must be finite", [good], {"weights": [-1]}),
        (FileNotFoundError, "no such tokenizer directory", [good], {"tokenizer_dir": str(tmp_path / "nope")}),
    ]
    for error, message, inputs, kw in cases:
        args = {"tokenizer_dir": tokenizer_dir, "seq_len": SEQ_LEN, **kw}
        with pytest.raises(error, match=message) as info:
            prepare_data(args.pop("tokenizer_dir"), inputs, str(tmp_path / "out"), args.pop("seq_len"),
                         progress=False, **args)
        assert "\n" not in str(info.value)
    for content, message in (('{"text": "ok"}\n{"text": "broken\n',
                              r"bad.jsonl:2: not valid JSON \(invalid control character, column 17\)$"),
                             ('{"text": "ok"}\n\n["a list"]\n', r"bad.jsonl:3: expected a JSON object"),
                             ('{"title": "no text"}\n', r"bad.jsonl:1: expected a JSON object with a string")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(DataError, match=message) as info:
            prepare_data(tokenizer_dir, [good, str(bad)], str(tmp_path / "out"), SEQ_LEN, workers=1, progress=False)
        assert "\n" not in str(info.value)
        # Nothing half-written: no output; the good source's committed unit is kept for a rerun, no temporaries.
        assert sorted(os.listdir(tmp_path)) == [".out.partial", "bad.jsonl"]
        assert not [n for n in os.listdir(tmp_path / ".out.partial") if ".tmp-" in n or n == "index.json"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        prepare_data(tokenizer_dir, [good], str(tmp_path / "taken"), SEQ_LEN, progress=False)


def test_loader_errors(prepared, tmp_path):
    ds = PackedDataset.open(prepared)
    with pytest.raises(DataError, match="not divisible by 3 processes"):
        ds.batch(0, global_batch_size=8, process_count=3)
    with pytest.raises(DataError, match="process_index 2 is not in"):
        ds.batch(0, global_batch_size=8, process_index=2, process_count=2)
    with pytest.raises(DataError, match="3 weights for 2 sources"):
        PackedDataset.open(prepared, weights=[1, 1, 1])
    with pytest.raises(FileNotFoundError, match="no index.json"):
        PackedDataset.open(str(tmp_path))


def test_cli_builds_a_tokenizer_and_prepares_data(tmp_path, capsys):
    import normistral

    heldout = os.path.join(CORPUS, "heldout.jsonl")
    pairs = os.path.join(CORPUS, "translation_pairs.jsonl")
    normistral.main(["build-tokenizer", "--input", pairs, heldout, "--output", str(tmp_path / "tok"),
                     "--vocab-size", "400"])
    normistral.main(["prepare-data", "--tokenizer", str(tmp_path / "tok"), "--input", pairs, heldout,
                     "--output", str(tmp_path / "data"), "--seq-len", "32", "--weights", "0.9", "0.1"])
    ds = PackedDataset.open(str(tmp_path / "data"))
    assert ds.seq_len == 32 and ds.weights.tolist() == pytest.approx([0.9, 0.1])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        normistral.main(["prepare-data", "--tokenizer", str(tmp_path / "tok"), "--input", pairs,
                         "--output", str(tmp_path / "data2"), "--seq-len", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("normistral: error: seq_len") and err.count("\n") == 1


# -- the same data on gs:// (the GCS emulator), lazy opening, prefetching -----------------------------------


def test_gcs_data_gives_the_same_batches_with_range_reads(prepared, gcs_bucket):
    from jaxmodel import storage

    remote = f"{gcs_bucket}/data"
    with storage.atomic_directory(remote) as out:
        storage.upload_dir(prepared, out)
    local, ds = PackedDataset.open(prepared), PackedDataset.open(remote)
    for step in (0, 3, 11):  # several shards, several processes
        for p in range(2):
            a = local.batch(step, global_batch_size=8, process_index=p, process_count=2, seed=5)
            b = ds.batch(step, global_batch_size=8, process_index=p, process_count=2, seed=5)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # An upload that did not finish (no commit marker) is refused by name.
    storage.remove(f"{remote}/{storage.COMMITTED}")
    with pytest.raises(storage.StorageError, match=f"{remote}: uncommitted data directory"):
        PackedDataset.open(remote)


def test_open_reads_only_the_index_and_a_missing_shard_is_reported_on_first_read(prepared, tmp_path):
    import shutil

    copy = str(tmp_path / "data")
    shutil.copytree(prepared, copy)
    index = json.load(open(os.path.join(copy, "index.json")))
    assert len(index["shards"]) > 2
    victim = index["shards"][-1]["segment_ids"]
    os.remove(os.path.join(copy, victim))
    ds = PackedDataset.open(copy)  # no per-shard work at open
    first = int(ds.shard_starts[0])
    ds.read_rows(np.array([first]))  # rows of an intact shard read fine
    last = int(ds.shard_starts[-2])
    with pytest.raises(FileNotFoundError, match=f"{copy}: shard file {victim} is missing"):
        ds.read_rows(np.array([last]))


def test_prefetcher_returns_exactly_the_batches_in_any_order(prepared):
    from training.data import Prefetcher

    ds = PackedDataset.open(prepared)
    calls = []

    def fn(step):
        calls.append(step)
        return ds.batch(step, global_batch_size=4)

    loader = Prefetcher(fn, 3, depth=2)
    try:
        for step in (3, 4, 5, 9, 10, 2):  # in order, then a jump forward and one back
            got, want = loader.get(step), ds.batch(step, global_batch_size=4)
            assert all(np.array_equal(got[k], want[k]) for k in want), step
        assert max(calls) <= 10 + 2 + 1  # bounded read-ahead
    finally:
        loader.close()
    failing = Prefetcher(lambda step: 1 // (step - 1), 0)  # an error is raised by get() for its step
    assert failing.get(0) == -1
    with pytest.raises(ZeroDivisionError):
        failing.get(1)
    failing.close()
