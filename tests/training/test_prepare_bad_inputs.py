"""prepare-data's inputs at the door: every codec's truncation and corruption, a file not of the codec its name
gives, extensions in any letter case, unknown extensions refused with the supported list, `--text-column`
for JSON lines, an unreachable RAY_ADDRESS, and refusals that leave nothing behind.

Each refusal is checked as the user sees it: exit status 2, the last stderr line, no traceback, and the
output's parent directory holding only what the test put there. Real codecs (gzip, zstandard, bz2, lzma)
and real files throughout.
"""

import bz2
import gzip
import json
import lzma
import os
import socket
import subprocess
import sys
import time

import pytest
import zstandard

from tests.training.conftest import CORPUS
from training.documents import iter_documents

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUPPORTED = ".jsonl, .txt (each also .gz, .zst, .bz2, .xz), .parquet; letter case ignored"
COMPRESS = {"gz": gzip.compress, "zst": lambda b: zstandard.ZstdCompressor().compress(b), "bz2": bz2.compress,
            "xz": lzma.compress}
CODEC = {"gz": "gzip", "zst": "zstd", "bz2": "bz2", "xz": "xz"}


@pytest.fixture(scope="module")
def docs():
    """Documents without blank lines inside (so that .txt holds the same ones)."""
    out = [d for d in iter_documents(os.path.join(CORPUS, "nb.jsonl"))
           if "\n\n" not in d and all(line.strip() for line in d.split("\n")) and "\r" not in d]
    return out[:60]


def _lines(docs, field="text"):
    return "".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()


def _run(capsys, tokenizer_dir, inputs, output, *extra):
    """`normistral prepare-data` in this process (one worker): (exit status, stderr)."""
    import normistral

    args = ["prepare-data", "--tokenizer", tokenizer_dir, "--input", *inputs, "--output", str(output),
            "--seq-len", "64", "--workers", "1", *extra]
    capsys.readouterr()
    try:
        normistral.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _refused(code, err, message, *, prefix=False):
    """Exit 2, `message` as the last stderr line (or its start), no traceback."""
    last = err.rstrip("\n").split("\n")[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith(f"normistral: error: {message}") if prefix else last == f"normistral: error: {message}", err


def _cli(args, env=None, timeout=120):
    """A real `normistral` process: (exit status, stderr, seconds)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "normistral", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - t0


@pytest.mark.parametrize("ext", list(COMPRESS))
def test_every_codec_truncated_or_corrupt_is_one_line_naming_the_file(ext, docs, tokenizer_dir, tmp_path, capsys):
    whole = COMPRESS[ext](_lines(docs))
    middle = len(whole) // 2
    (tmp_path / f"cut.jsonl.{ext}").write_bytes(whole[:middle])  # a cut download
    (tmp_path / f"tail.jsonl.{ext}").write_bytes(whole[:-4])  # only the end marker / checksum missing
    (tmp_path / f"bad.jsonl.{ext}").write_bytes(whole[:middle] + bytes(200) + whole[middle + 200:])
    inputs = sorted(os.listdir(tmp_path))
    codec = CODEC[ext]
    for name in ("cut", "tail"):
        path = str(tmp_path / f"{name}.jsonl.{ext}")
        code, err = _run(capsys, tokenizer_dir, [path], tmp_path / "out")
        _refused(code, err, f"{path}: cannot be read: truncated (the {codec} stream ends before its end marker)")
    path = str(tmp_path / f"bad.jsonl.{ext}")
    code, err = _run(capsys, tokenizer_dir, [path], tmp_path / "out")
    _refused(code, err, f"{path}: cannot be read: corrupt {codec} data (", prefix=True)
    assert sorted(os.listdir(tmp_path)) == inputs


def test_a_truncated_zst_fails_in_a_real_run(docs, tokenizer_dir, tmp_path):
    """The issue's case end to end (two workers): a cut .jsonl.zst used to read as fewer documents, or none."""
    whole = zstandard.ZstdCompressor().compress(_lines(docs * 20))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[:len(whole) * 3 // 4])
    good = tmp_path / "good.jsonl"
    good.write_bytes(_lines(docs))
    code, err, _ = _cli(["prepare-data", "--tokenizer", tokenizer_dir, "--input", str(good), str(path),
                         "--output", str(tmp_path / "out"), "--seq-len", "64", "--workers", "2"])
    _refused(code, err, f"{path}: cannot be read: truncated (the zstd stream ends before its end marker)")
    assert "\r" not in err.rstrip("\n").split("\n")[-1]
    left = sorted(os.listdir(tmp_path))
    if ".out.partial" in left:  # the other source's unit was committed first: kept for a rerun, and said so
        assert "kept 1 of 2 committed units" in err and left == [".out.partial", "cut.jsonl.zst", "good.jsonl"]
        assert not [n for n in os.listdir(tmp_path / ".out.partial") if ".tmp-" in n]
    else:
        assert left == ["cut.jsonl.zst", "good.jsonl"]


@pytest.mark.parametrize("name,content,what", [
    ("gz.jsonl.zst", "gzip", "it is gzip data"),
    ("plain.jsonl.zst", "plain", "it does not start with the zstd signature (not compressed?)"),
    ("empty.jsonl.zst", "empty", "it is empty"),
    ("plain.jsonl.bz2", "plain", "it does not start with the bz2 signature (not compressed?)"),
    ("zst.txt.gz", "zst", "it is zstd data"),
])
def test_a_file_not_of_its_codec_is_refused_saying_what_it_is(name, content, what, docs, tokenizer_dir, tmp_path,
                                                              capsys):
    data = {"gzip": gzip.compress(_lines(docs)), "plain": _lines(docs), "empty": b"",
            "zst": COMPRESS["zst"](_lines(docs))}[content]
    path = tmp_path / name
    path.write_bytes(data)
    ext = "." + name.rsplit(".", 1)[1]
    code, err = _run(capsys, tokenizer_dir, [str(path)], tmp_path / "out")
    _refused(code, err, f"{path}: not {CODEC[ext[1:]]} data: the name ends in {ext}, but {what}")
    assert os.listdir(tmp_path) == [name]


def test_compressed_text_named_plain_says_so(docs, tokenizer_dir, tmp_path, capsys):
    """A .bz2 read as text used to say only "not UTF-8"; the cause is named."""
    path = tmp_path / "d.txt"
    path.write_bytes(bz2.compress("\n\n".join(docs).encode()))
    code, err = _run(capsys, tokenizer_dir, [str(path)], tmp_path / "out")
    _refused(code, err, f"{path}: not UTF-8 text (invalid start byte); it is bz2-compressed: name it d.txt.bz2")
    assert os.listdir(tmp_path) == ["d.txt"]


def test_every_extension_and_codec_in_any_letter_case_reads_the_same(docs, tokenizer_dir, tmp_path, capsys):
    """`.JSONL` used to be read as plain text (a whole JSON line as a document); `.bz2` / `.xz` as text too;
    a .zst of several frames (concatenated files) is read to its end."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data import PackedDataset

    text = ("\n\n".join(docs) + "\n").encode()
    frames = COMPRESS["zst"](_lines(docs[:25])) + COMPRESS["zst"](_lines(docs[25:]))
    files = {"ref.jsonl": _lines(docs), "UP.JSONL": _lines(docs), "d.Jsonl.BZ2": bz2.compress(_lines(docs)),
             "d.jsonl.xz": lzma.compress(_lines(docs)), "frames.jsonl.zst": frames,
             "D.TXT.GZ": gzip.compress(text), "d.txt.xz": lzma.compress(text)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pq.write_table(pa.table({"text": docs}), tmp_path / "D.PARQUET")

    def tokens(out):
        ds = PackedDataset.open(str(out))
        rows = ds.read_rows(np.arange(ds.num_rows))
        return np.concatenate([t[s != 0] for t, s in zip(rows["tokens"], rows["segment_ids"])])

    assert _run(capsys, tokenizer_dir, [str(tmp_path / "ref.jsonl")], tmp_path / "ref")[0] == 0
    reference = tokens(tmp_path / "ref")
    for name in [*files, "D.PARQUET"][1:]:
        out = tmp_path / f"out-{name}"
        code, err = _run(capsys, tokenizer_dir, [str(tmp_path / name)], out)
        assert code == 0, err
        assert np.array_equal(tokens(out), reference), name
        index = json.loads((out / "index.json").read_text())
        assert index["sources"][0]["documents"] == len(docs), name


@pytest.mark.parametrize("layout", ["file.json", "file.csv", "file-no-extension", "dir", "glob"])
def test_unknown_extensions_are_refused_with_the_supported_list(layout, docs, tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(_lines(docs))
    (data / "README.md").write_text("about this data")  # documentation and hidden files are passed over
    (data / ".gitattributes").write_text("* binary")
    name = {"file.json": "b.json", "file.csv": "b.csv", "file-no-extension": "b"}.get(layout, "b.json")
    (data / name).write_bytes(_lines(docs))
    spec = {"dir": str(data), "glob": str(data / "*.js*")}.get(layout, str(data / name))
    code, err = _run(capsys, tokenizer_dir, [spec], tmp_path / "out")
    hint = "; JSON lines go in a .jsonl file" if name.endswith(".json") else ""
    _refused(code, err, f"{data / name}: not a supported input format ({SUPPORTED}{hint})")
    assert os.listdir(tmp_path) == ["data"]


def test_a_directory_passes_over_hidden_files_and_documentation(docs, tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.JSONL").write_bytes(_lines(docs[:30]))
    (data / "b.txt").write_text("\n\n".join(docs[30:]) + "\n")
    for name in ("README.md", "LICENSE", ".gitattributes", "_SUCCESS", "notes.MD"):
        (data / name).write_text("not data")
    code, err = _run(capsys, tokenizer_dir, [str(data)], tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "index.json").read_text())["sources"][0]["documents"] == len(docs)


@pytest.mark.parametrize("ext", ["jsonl", "jsonl.gz"])
def test_text_column_names_the_json_field(ext, docs, tokenizer_dir, tmp_path, capsys):
    """--text-column was ignored for JSON lines: a file whose text is in `content` packed its `text` field."""
    lines = "".join(json.dumps({"text": "the wrong field", "content": d}, ensure_ascii=False) + "\n" for d in docs)
    data = lines.encode() if ext == "jsonl" else gzip.compress(lines.encode())
    (tmp_path / f"c.{ext}").write_bytes(data)
    (tmp_path / "ref.jsonl").write_bytes(_lines(docs))
    assert _run(capsys, tokenizer_dir, [str(tmp_path / "ref.jsonl")], tmp_path / "ref")[0] == 0
    code, err = _run(capsys, tokenizer_dir, [str(tmp_path / f"c.{ext}")], tmp_path / "out", "--text-column", "content")
    assert code == 0, err
    npy = sorted(n for n in os.listdir(tmp_path / "ref") if n.endswith(".npy"))
    assert npy and all((tmp_path / "out" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes() for n in npy)
    # a field no record has: one line naming the line and the fields there are, nothing left
    path = tmp_path / f"c.{ext}"
    code, err = _run(capsys, tokenizer_dir, [str(path)], tmp_path / "none", "--text-column", "body")
    _refused(code, err, f"{path}:1: expected a JSON object with a string field 'body'; its fields: text, content "
                        "(choose one with --text-column)")
    assert not (tmp_path / "none").exists() and ".none.partial" not in os.listdir(tmp_path)


def test_refusals_leave_nothing_behind(tokenizer_dir, tmp_path, capsys):
    """"no documents" used to keep a hidden .NAME.partial (and a rerun refused again); directories created
    for the output go too."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "blank.jsonl").write_text('{"text": "  "}\n\n{"text": ""}\n')
    (inputs / "binary.txt").write_bytes(b"\x00\xff\xfe binary")
    out = tmp_path / "new" / "deeper" / "out"
    code, err = _run(capsys, tokenizer_dir, [str(inputs / "blank.jsonl")], out)
    _refused(code, err, f"{inputs / 'blank.jsonl'}: no documents")
    assert os.listdir(tmp_path) == ["in"]
    code, err = _run(capsys, tokenizer_dir, [str(inputs / "binary.txt")], out)
    _refused(code, err, f"{inputs / 'binary.txt'}: not UTF-8 text (invalid start byte)")
    assert os.listdir(tmp_path) == ["in"]


def test_an_unreachable_ray_address_is_one_line_within_seconds(tokenizer_dir, tmp_path):
    """ray.init retried a closed address for minutes (20 attempts of ~35 s in Ray 2.60)."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")  # it is in the test extra
    (tmp_path / "d.jsonl").write_bytes(_lines(["one document"]))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    code, err, seconds = _cli(["prepare-data", "--tokenizer", tokenizer_dir, "--input", str(tmp_path / "d.jsonl"),
                               "--output", str(tmp_path / "out"), "--seq-len", "64", "--engine", "ray"],
                              env={"RAY_ADDRESS": address}, timeout=60)
    _refused(code, err, f"RAY_ADDRESS={address}: cannot reach the Ray cluster (connection refused); start it, fix "
                        "the address, or unset RAY_ADDRESS for a local cluster")
    assert err.count("\n") == 1 and seconds < 30, (err, seconds)
    assert os.listdir(tmp_path) == ["d.jsonl"]


def test_build_tokenizer_reads_an_uppercase_jsonl_as_json_lines(docs, tmp_path):
    """The tokenizer trainer's reader (training/documents.py) used to read `.JSONL` as plain text."""
    path = tmp_path / "D.JSONL"
    path.write_bytes(_lines(docs))
    assert list(iter_documents(str(path))) == docs
