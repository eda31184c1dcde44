"""prepare-data at scale: every input format, work units, worker-count independence, resume after kill -9
and Ctrl-C, the Ray engine, gs:// inputs and outputs, and the one-line errors.

The reference for what a prepared directory must hold is independent of training/prepare.py: each
document encoded by transformers' own tokenizer call (`tok(text, split_special_tokens=True)`) plus
`</s>`, in input order; a run's packed rows, read back without their padding, must spell exactly that.
"""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.training.conftest import CORPUS
from training.data import PackedDataset
from training.documents import DataError, iter_documents
from training.prepare import prepare_data

SEQ_LEN = 64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def docs():
    """Documents that survive every format (no blank lines inside, for .txt), some spelling special
    tokens, some longer than a row."""
    out = []
    for name in ("nb.jsonl", "nn.jsonl", "se.jsonl"):
        out += [d for d in iter_documents(os.path.join(CORPUS, name))
                if "\n\n" not in d and all(line.strip() for line in d.split("\n")) and "\r" not in d]
    out = out[:90]
    out[3] = "Teksten </s> er ikke slutten, og <s> er ikke starten."
    out[10] = "Et langt dokument. " * 40 + "Slutt."
    return out


@pytest.fixture(scope="module")
def reference(docs, tok):
    return _reference(docs, tok)


def _reference(docs, tok):
    stream = []
    for d in docs:
        stream += tok(d, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return np.asarray(stream, np.int32)


def _stream(directory):
    """The packed tokens of a local prepared directory, in row order, without padding."""
    ds = PackedDataset.open(directory)
    rows = ds.read_rows(np.arange(ds.num_rows))
    return np.concatenate([t[s != 0] for t, s in zip(rows["tokens"], rows["segment_ids"])])


def _files(directory):
    """{name: bytes} of every file of a prepared directory (local or gs://)."""
    from jaxmodel import storage

    out = {}
    for name in storage.listdir(directory):
        with storage.open(storage.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


def _jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    return str(path)


def _write(fmt, root, docs):
    """One file (or dataset directory) in format `fmt` holding `docs`; (path, extra prepare_data kwargs)."""
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
    if fmt == "jsonl":
        return _jsonl(root / "d.jsonl", docs), {}
    if fmt == "jsonl.gz":
        path = root / "d.jsonl.gz"
        path.write_bytes(gzip.compress(lines))
        return str(path), {}
    if fmt == "jsonl.zst":
        import zstandard

        path = root / "d.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
        return str(path), {}
    if fmt == "txt":
        path = root / "d.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        return str(path), {}
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "d.parquet"
        table = pa.table({"id": list(range(len(docs))), "content": docs})
        pq.write_table(table, path, row_group_size=16)  # several row groups: several units below
        assert pq.ParquetFile(path).metadata.num_row_groups > 3
        return str(path), {"text_column": "content", "unit_bytes": 4000}
    if fmt == "hf-dataset":
        from datasets import Dataset

        path = root / "ds"
        Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(path), num_shards=3)
        return str(path), {}
    raise AssertionError(fmt)


FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "txt", "parquet", "hf-dataset"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_packs_exactly_the_documents(fmt, docs, reference, tokenizer_dir, tmp_path):
    path, kw = _write(fmt, tmp_path, docs)
    out = str(tmp_path / "out")
    index = prepare_data(tokenizer_dir, [path], out, SEQ_LEN, shard_tokens=SEQ_LEN * 5, workers=1,
                         progress=False, **kw)
    assert np.array_equal(_stream(out), reference)
    source = index["sources"][0]
    assert source["documents"] == len(docs) and source["tokens"] == len(reference)
    assert source["rows"] == [0, index["num_rows"]] and index["max_token_id"] == int(reference.max())
    assert index["vocab_size"] == 2048 and index["tokenizer"]["bos_id"] == 1 and index["tokenizer"]["pad_id"] == 3
    assert sorted(os.listdir(tmp_path))[-1] == "out" and not [n for n in os.listdir(tmp_path) if "partial" in n]
    if fmt in ("parquet", "hf-dataset"):  # several units (row-group runs / Arrow files): one row closed per unit
        assert len({name.split("-")[1] for name in os.listdir(out) if name.endswith(".npy")}) > 1


def test_directories_globs_and_byte_ranges(docs, reference, tokenizer_dir, tmp_path):
    """A directory of mixed formats reads in sorted order; a .jsonl cut into many byte ranges loses and
    duplicates no line (lines cross every unit boundary)."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    thirds = [docs[:30], docs[30:60], docs[60:]]
    (mixed / "a.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": d}) + "\n" for d in thirds[0]).encode()))
    _jsonl(mixed / "b.jsonl", thirds[1])
    (mixed / "c.txt").write_text("\n\n".join(thirds[2]) + "\n")
    (mixed / "README.md").write_text("not an input")
    a = str(tmp_path / "a")
    prepare_data(tokenizer_dir, [str(mixed)], a, SEQ_LEN, workers=1, progress=False)
    assert np.array_equal(_stream(a), reference)
    b = str(tmp_path / "b")
    index = prepare_data(tokenizer_dir, [str(mixed / "*.j*")], b, SEQ_LEN, workers=1, progress=False)
    assert index["sources"][0]["documents"] == 60

    big = _jsonl(tmp_path / "big.jsonl", docs)
    c = str(tmp_path / "c")
    index = prepare_data(tokenizer_dir, [big], c, SEQ_LEN, workers=1, unit_bytes=997, progress=False)
    units = {name.split("-")[1] for name in os.listdir(c) if name.endswith(".npy")}
    assert len(units) > 10
    assert np.array_equal(_stream(c), reference)
    assert index["sources"][0]["documents"] == len(docs)


def test_output_is_the_same_for_any_worker_count(docs, tokenizer_dir, tmp_path):
    a_docs, b_docs = docs[:50], docs[50:]
    inputs = [_jsonl(tmp_path / "a.jsonl", a_docs), _jsonl(tmp_path / "b.jsonl", b_docs)]
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    prepare_data(tokenizer_dir, inputs, one, SEQ_LEN, weights=[2, 1], unit_bytes=1500, workers=1, progress=False)
    index = prepare_data(tokenizer_dir, inputs, two, SEQ_LEN, weights=[2, 1], unit_bytes=1500, workers=2,
                         progress=False)
    assert len(index["shards"]) > 8
    assert _files(one) == _files(two)
    assert [s["weight"] for s in index["sources"]] == pytest.approx([2 / 3, 1 / 3])


def _corpus_file(path, copies):
    """A .jsonl of the bundled corpus repeated: enough work for a run to be killed in the middle."""
    lines = []
    for name in ("nb.jsonl", "nn.jsonl", "se.jsonl", "en.jsonl"):
        lines += [json.dumps({"text": d}, ensure_ascii=False) + "\n"
                  for d in iter_documents(os.path.join(CORPUS, name))]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines * copies)
    return str(path)


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "normistral", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _interrupt_midway(proc, partial, sig):
    """Sends `sig` to the run's process group once some unit is committed; returns the committed count."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(partial) if os.path.isdir(partial) else []
        done = [n for n in names if n.endswith(".json") and n.startswith("unit-")]
        if done:
            os.killpg(proc.pid, sig)
            return len(done)
        time.sleep(0.01)
    raise AssertionError(f"the run ended before a unit was committed: {proc.communicate()}")


@pytest.fixture(scope="module")
def big_run(tokenizer_dir, tmp_path_factory):
    """A corpus of ~60 units and its uninterrupted single-process output."""
    root = tmp_path_factory.mktemp("big")
    corpus = _corpus_file(root / "corpus.jsonl", 6)
    ref = str(root / "ref")
    prepare_data(tokenizer_dir, [corpus], ref, SEQ_LEN, unit_bytes=30_000, workers=1, progress=False)
    return corpus, ref


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_an_interrupted_run_resumes_to_the_same_output(sig, big_run, tokenizer_dir, tmp_path):
    corpus, ref = big_run
    out = tmp_path / "out"
    args = ["prepare-data", "--tokenizer", tokenizer_dir, "--input", corpus, "--output", str(out),
            "--seq-len", str(SEQ_LEN), "--unit-mb", str(30_000 / 2**20), "--workers", "2"]
    proc = _cli(args)
    committed = _interrupt_midway(proc, tmp_path / ".out.partial", sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()
    partial = os.listdir(tmp_path / ".out.partial")
    units = len([n for n in partial if n.startswith("unit-") and n.endswith(".json")])
    total = len(json.loads(open(os.path.join(ref, "index.json")).read())["shards"])
    assert committed <= units < total, "the run must be stopped in the middle"
    if sig == signal.SIGINT:  # one line, exit 130, the in-flight temporaries removed
        lines = err.strip().splitlines()
        assert proc.returncode == 130 and lines[-1].startswith("normistral: error: interrupted"), err
        assert "Traceback" not in err and not [n for n in partial if ".tmp-" in n]
    else:
        assert proc.returncode == -signal.SIGKILL
    rerun = _cli(args)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"{units} of" in err and "units already done" in err  # it skipped the committed units
    assert _files(str(out)) == _files(ref)
    assert not (tmp_path / ".out.partial").exists()


def test_ray_engine_matches_the_single_process_output(big_run, tokenizer_dir, tmp_path):
    pytest.importorskip("ray", reason="the [ray] extra is not installed")  # it is in the test extra
    corpus, ref = big_run
    out = str(tmp_path / "ray")
    prepare_data(tokenizer_dir, [corpus], out, SEQ_LEN, unit_bytes=30_000, workers=2, engine="ray",
                 progress=False)
    assert _files(out) == _files(ref)


def test_prepare_data_reads_and_writes_gcs(gcs_bucket, docs, reference, tokenizer_dir, tmp_path, capsys):
    import normistral
    from jaxmodel import storage

    local = _jsonl(tmp_path / "d.jsonl", docs)
    ref = str(tmp_path / "ref")
    prepare_data(tokenizer_dir, [local], ref, SEQ_LEN, unit_bytes=2000, workers=1, progress=False)
    common = ["--tokenizer", tokenizer_dir, "--seq-len", str(SEQ_LEN), "--unit-mb", str(2000 / 2**20),
              "--workers", "1"]
    normistral.main(["prepare-data", "--input", local, "--output", f"{gcs_bucket}/from-local", *common])
    remote = _files(f"{gcs_bucket}/from-local")
    assert remote.pop(storage.WRITING) == b"" and remote.pop(storage.COMMITTED) == b""
    assert remote == _files(ref)

    storage.copy_file(local, f"{gcs_bucket}/in/d.jsonl")  # same bytes, so the same units
    normistral.main(["prepare-data", "--input", f"{gcs_bucket}/in/d.jsonl", "--output", f"{gcs_bucket}/from-gcs",
                     *common])
    remote = _files(f"{gcs_bucket}/from-gcs")
    index = json.loads(remote["index.json"])
    assert index["sources"][0]["path"] == f"{gcs_bucket}/in/d.jsonl" and index["sources"][0]["tokens"] == len(reference)
    ref_files = _files(ref)
    ref_index = json.loads(ref_files.pop("index.json"))
    assert {k: v for k, v in remote.items() if k.endswith(".npy")} == ref_files
    assert index["shards"] == ref_index["shards"]

    capsys.readouterr()  # an existing committed output is refused, one line
    with pytest.raises(SystemExit) as info:
        normistral.main(["prepare-data", "--input", local, "--output", f"{gcs_bucket}/from-local", *common])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.strip().splitlines()[-1].startswith("normistral: error:") and \
        "from-local: already prepared" in err


def _tokenizer_copy(tokenizer_dir, root, broken):
    import shutil

    out = root / f"tok-{broken}"
    shutil.copytree(tokenizer_dir, out)
    if broken == "empty":
        for name in os.listdir(out):
            os.unlink(out / name)
    else:
        (out / broken).write_text("{ not json")
    return str(out)


@pytest.mark.parametrize("broken", ["empty", "tokenizer.json", "config.json", "tokenizer_config.json"])
def test_a_broken_tokenizer_directory_is_one_line(broken, tokenizer_dir, docs, tmp_path, capsys):
    import normistral

    tok = _tokenizer_copy(tokenizer_dir, tmp_path, broken)
    data = _jsonl(tmp_path / "d.jsonl", docs[:5])
    with pytest.raises(SystemExit) as info:
        normistral.main(["prepare-data", "--tokenizer", tok, "--input", data, "--output", str(tmp_path / "out"),
                         "--seq-len", "32"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"normistral: error: {tok}"), err
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", f"tok-{broken}"]


def test_bad_records_name_the_file_and_record_after_the_bar(docs, tokenizer_dir, tmp_path):
    """The error is the last line, on its own (the progress bar is closed first), for every format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = _jsonl(tmp_path / "good.jsonl", docs[:40])
    lines = open(good).read().splitlines()
    lines[33] = '{"text": 5}'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")  # line 34, in a later byte-range unit
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"\n'))
    whole = gzip.compress(open(good, "rb").read())
    (tmp_path / "trunc.jsonl.gz").write_bytes(whole[:len(whole) // 2])  # a cut download
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "null.parquet")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
    cases = [("bad.jsonl", "bad.jsonl:34: expected a JSON object with a string field 'text'"),
             ("bad.jsonl.gz", "bad.jsonl.gz:2: not valid JSON"),
             ("trunc.jsonl.gz", "trunc.jsonl.gz: cannot be read"),
             ("null.parquet", "null.parquet: row 1: column 'text' is None"),
             ("nocol.parquet", "nocol.parquet: no column 'text' (columns: body)")]
    for name, message in cases:
        out = str(tmp_path / f"out-{name}")
        proc = _cli(["prepare-data", "--tokenizer", tokenizer_dir, "--input", good, str(tmp_path / name),
                     "--output", out, "--seq-len", "32", "--unit-mb", str(1000 / 2**20),
                     "--workers", "2"]) if name == "bad.jsonl" else None
        if proc is not None:  # one real CLI run: the bar on stderr, then the error line
            _, err = proc.communicate(timeout=300)
            last = err.rstrip("\n").split("\n")[-1]
            assert proc.returncode == 2 and last.startswith("normistral: error: ") and message in last, err
            assert "Traceback" not in err and "\r" not in last
            continue
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            prepare_data(tokenizer_dir, [str(tmp_path / name)], out, 32, workers=1, progress=False)
        assert "\n" not in str(info.value)
        assert not os.path.exists(out)


def test_resume_refuses_other_settings(docs, tokenizer_dir, tmp_path):
    bad = tmp_path / "d.jsonl"
    _jsonl(bad, docs[:20])
    with open(bad, "a") as f:
        f.write("not json\n")
    first = _jsonl(tmp_path / "first.jsonl", docs[20:40])
    with pytest.raises(DataError, match="d.jsonl:21: not valid JSON"):
        prepare_data(tokenizer_dir, [first, str(bad)], str(tmp_path / "out"), SEQ_LEN, workers=1, progress=False)
    assert (tmp_path / ".out.partial").is_dir()  # the first source's unit is kept
    with pytest.raises(DataError, match="holds an interrupted preparation with other settings"):
        prepare_data(tokenizer_dir, [first, str(bad)], str(tmp_path / "out"), 32, workers=1, progress=False)
    _jsonl(bad, docs[:20])  # fixed: the rerun redoes that file's unit only and finishes
    index = prepare_data(tokenizer_dir, [first, str(bad)], str(tmp_path / "out"), SEQ_LEN, workers=1,
                         progress=False)
    assert [s["documents"] for s in index["sources"]] == [20, 20]
    assert not (tmp_path / ".out.partial").exists()


def test_hub_sources_fail_in_one_line_offline(tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match="hf:x: a hub dataset is hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"):
        prepare_data(tokenizer_dir, ["hf:x"], str(tmp_path / "out"), SEQ_LEN, progress=False)
    proc = _cli(["prepare-data", "--tokenizer", tokenizer_dir, "--input", "hf:nosuch/dataset:train",
                 "--output", str(tmp_path / "out"), "--seq-len", "32"])  # offline (_cli sets HF_HUB_OFFLINE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith("normistral: error: hf:nosuch/dataset:train: cannot open the hub dataset"), err
    assert not os.listdir(tmp_path)
