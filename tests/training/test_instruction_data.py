"""Prompt/completion data (`prepare-data --prompt-field/--completion-field/--template`): the stored loss mask,
packing that does not depend on the worker count, a loss that gives prompt tokens exactly zero weight, a
`normistral train` run on such data, and the one-line errors for bad records.

The reference for the mask is independent of training/prepare.py: transformers' own tokenizer call on the
templated prompt alone and on prompt + completion (the first is a prefix of the second for these records);
the tokens after the prompt's, and the `</s>` appended, are the ones to learn.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.training.conftest import CORPUS
from training.data import MASK, PackedDataset
from training.documents import DataError
from training.prepare import prepare_data

SEQ_LEN = 48
TEMPLATE = "Engelsk: {0}\nBokmål:"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = {"prompt_field": "en", "completion_field": "nb", "template": TEMPLATE}


@pytest.fixture(scope="module")
def records():
    """(prompt, completion) pairs: the bundled translation pairs, plus an empty prompt, a completion spelling
    `</s>`, a prompt with braces (only the template is a format string) and one longer than a row."""
    out = []
    with open(os.path.join(CORPUS, "translation_pairs.jsonl"), encoding="utf-8") as f:
        for line in f:
            en, nb = json.loads(line)["text"].split("\nBokmål:")
            out.append((en.removeprefix("Engelsk: "), nb.rstrip("\n")))
    out[5] = ("", " Tom.")
    out[9] = ("Write </s> here.", " Skriv </s> her.")
    out[12] = ("Use {braces} and {0}.", " Bruk {klammer} og {0}.")
    out[20] = ("A long one. " * 8, " En lang en." * 8)
    return out


def _write_jsonl(path, records, drop=None):
    """The records as JSON lines with fields en, nb, id (record `drop` loses its nb)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (en, nb) in enumerate(records):
            record = {"id": i, "en": en} if i == drop else {"en": en, "nb": nb, "id": i}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def _files(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def source(tmp_path_factory, records):
    return _write_jsonl(tmp_path_factory.mktemp("records") / "pairs.jsonl", records)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer_dir, source):
    """The records prepared by one process, cut into several units (2,000 bytes each)."""
    out = str(tmp_path_factory.mktemp("prepared") / "one")
    prepare_data(tokenizer_dir, [source], out, SEQ_LEN, workers=1, unit_bytes=2000, progress=False, **FIELDS)
    return out


def _reference(records, tok):
    """(tokens, mask) of the whole stream, record after record, from transformers' tokenizer."""
    tokens, mask = [], []
    for prompt, completion in records:
        text = TEMPLATE.format(prompt)
        prompt_ids = tok(text, split_special_tokens=True)["input_ids"]
        full = tok(text + completion, split_special_tokens=True)["input_ids"]
        assert full[:len(prompt_ids)] == prompt_ids, (prompt, completion)
        tokens += full + [tok.eos_token_id]
        mask += [0] * len(prompt_ids) + [1] * (len(full) - len(prompt_ids)) + [1]
    return np.asarray(tokens), np.asarray(mask)


def _stream(directory):
    """(tokens, mask) of a prepared directory in row order without padding, and the mask on padding."""
    ds = PackedDataset.open(directory)
    rows = ds.read_rows(np.arange(ds.num_rows))
    real = rows["segment_ids"] != 0
    return rows["tokens"][real], rows[MASK][real], rows[MASK][~real]


def test_mask_marks_exactly_the_completion_tokens_and_eos(prepared, records, tok):
    ref_tokens, ref_mask = _reference(records, tok)
    tokens, mask, padding = _stream(prepared)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(mask, ref_mask)
    assert padding.size > 0 and not padding.any()
    index = json.load(open(os.path.join(prepared, "index.json")))
    assert index["format"] == 2 and index["instruction"] == FIELDS
    assert len(index["shards"]) > 1  # several units: the long record is cut across rows too
    assert index["sources"][0]["documents"] == len(records)
    assert index["sources"][0]["trained_tokens"] == int(ref_mask.sum())


def test_records_pack_byte_identically_with_one_and_two_workers(prepared, tokenizer_dir, source, tmp_path):
    out = str(tmp_path / "two")
    prepare_data(tokenizer_dir, [source], out, SEQ_LEN, workers=2, unit_bytes=2000, progress=False, **FIELDS)
    one, two = _files(prepared), _files(out)
    assert any(name.endswith(f".{MASK}.npy") for name in one)
    assert one == two


def test_parquet_records_give_the_same_stream(prepared, records, tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"nb": [c for _, c in records], "en": [p for p, _ in records]}), path,
                   row_group_size=40)
    out = str(tmp_path / "parquet")
    prepare_data(tokenizer_dir, [str(path)], out, SEQ_LEN, workers=1, unit_bytes=1, progress=False, **FIELDS)
    for ours, theirs in zip(_stream(out), _stream(prepared)):
        np.testing.assert_array_equal(ours, theirs)


def test_plain_text_stays_format_1_and_trains_every_token(tokenizer_dir, tmp_path):
    out = str(tmp_path / "plain")
    prepare_data(tokenizer_dir, [os.path.join(CORPUS, "translation_pairs.jsonl")], out, SEQ_LEN, workers=1,
                 progress=False)
    index = json.load(open(os.path.join(out, "index.json")))
    assert index["format"] == 1 and "instruction" not in index
    assert not any(MASK in shard for shard in index["shards"])
    batch = PackedDataset.open(out).batch(0, global_batch_size=4)
    seg = batch["segment_ids"]
    same = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
    np.testing.assert_array_equal(batch["loss_mask"][:, :-1], same)


# -- the loss ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loss_setup(prepared, tokenizer_dir):
    """(jitted loss_and_grads, params, host batch, TrainSetup) of the tiny model on the prepared records."""
    from jaxmodel.sharding import make_mesh
    from training import config as train_config
    from training import step as steps_lib

    vocab = json.load(open(os.path.join(prepared, "index.json")))["vocab_size"]
    run = train_config.load({"_path": "test.yaml", "model": {"preset": "tiny", "vocab_size": vocab},
                             "train": {"steps": 2, "global_batch_size": 8, "seq_len": SEQ_LEN, "loss_chunk": 16},
                             "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant"}})
    ts = steps_lib.setup(run, make_mesh((1, 8, 1)))
    params = steps_lib.init_state(ts)["params"]
    batch = PackedDataset.open(prepared).batch(0, global_batch_size=8)
    fn = jax.jit(steps_lib.make_loss_and_grads(ts))
    return fn, params, batch, ts


def _loss(loss_setup, batch):
    from training import step as steps_lib

    fn, params, _, ts = loss_setup
    with jax.set_mesh(ts.mesh):
        loss, count, grads, _ = fn(params, steps_lib.put_batch(ts, batch), jax.random.key(0))
    return float(loss), float(count), jax.device_get(grads)


def _prompt_targets(batch, prepared):
    """[B, T-1] positions whose target is a prompt token of the same record (from the stored mask, which
    test_mask_marks_exactly_the_completion_tokens_and_eos checks against the reference)."""
    ds = PackedDataset.open(prepared)
    stored = ds.read_rows(ds.row_ids(0, global_batch_size=8))[MASK]
    seg = batch["segment_ids"]
    return (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1]) & (stored[:, 1:] == 0)


def test_prompt_targets_change_neither_loss_nor_gradients(loss_setup, prepared):
    _, _, batch, _ = loss_setup
    prompt = _prompt_targets(batch, prepared)
    assert prompt.sum() > 50  # plenty of prompt positions in the batch
    changed = {k: v.copy() for k, v in batch.items()}
    changed["targets"][:, :-1] = np.where(prompt, (batch["targets"][:, :-1] + 7) % 1000 + 16,
                                          batch["targets"][:, :-1])
    assert (changed["targets"] != batch["targets"]).sum() == prompt.sum()
    loss, count, grads = _loss(loss_setup, batch)
    loss2, count2, grads2 = _loss(loss_setup, changed)
    assert loss == loss2 and count == count2
    jax.tree.map(np.testing.assert_array_equal, grads, grads2)
    # the loss counts exactly the completion tokens and their </s> that follow a token of the same record
    seg = batch["segment_ids"]
    same = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
    assert count == float((same & ~prompt).sum()) > 0


def test_a_completion_target_changes_the_loss(loss_setup, prepared):
    _, _, batch, _ = loss_setup
    b, t = np.argwhere(batch["loss_mask"] == 1)[3]
    assert not _prompt_targets(batch, prepared)[b, t]
    changed = {k: v.copy() for k, v in batch.items()}
    changed["targets"][b, t] = (batch["targets"][b, t] + 7) % 1000 + 16
    loss, _, grads = _loss(loss_setup, batch)
    loss2, _, grads2 = _loss(loss_setup, changed)
    assert loss != loss2
    assert not np.array_equal(grads["lm_head"], grads2["lm_head"])


# -- the CLI ----------------------------------------------------------------------------------------------


def _cli(args, **env):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-m", "normistral", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_runs_on_instruction_data(prepared, tokenizer_dir, tmp_path):
    """A short `normistral train` on the prepared records: it exits 0 and each step's loss counts exactly
    the batch's completion tokens."""
    vocab = json.load(open(os.path.join(prepared, "index.json")))["vocab_size"]
    workdir = str(tmp_path / "run")
    sets = ["data.corpus=null", f"data.dir={prepared}", f"data.tokenizer_dir={tokenizer_dir}",
            f"model.vocab_size={vocab}", f"train.seq_len={SEQ_LEN}", "train.steps=3", "train.eval_every=0",
            "train.global_batch_size=8", "checkpoint.every=3"]
    proc = _cli(["train", "--config", os.path.join(ROOT, "configs", "tiny-cpu.yaml"), "--workdir", workdir,
                 *[a for s in sets for a in ("--set", s)]], JAX_NUM_CPU_DEVICES="8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [m for m in map(json.loads, f) if "loss_tokens" in m]
    assert [m["step"] for m in metrics] == [1, 2, 3], metrics
    ds = PackedDataset.open(prepared)
    for m in metrics:  # the run's batch `step - 1` (data.seed 0)
        assert m["loss_tokens"] == ds.batch(m["step"] - 1, global_batch_size=8)["loss_mask"].sum()
        assert np.isfinite(m["loss"])


def test_a_record_missing_a_field_is_one_line_before_any_output(records, tokenizer_dir, tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", records, drop=140)  # line 141, in a late unit
    out = tmp_path / "out" / "data"
    proc = _cli(["prepare-data", "--tokenizer", tokenizer_dir, "--input", path, "--output", str(out),
                 "--seq-len", str(SEQ_LEN), "--workers", "1", "--unit-mb", str(2000 / 2**20),
                 "--prompt-field", "en", "--completion-field", "nb", "--template", "Engelsk: {0}\\nBokmål:"])
    last = proc.stderr.rstrip("\n").split("\n")[-1]
    assert proc.returncode == 2, proc.stderr
    assert last == (f"normistral: error: {path}:141: expected a JSON object with a string field 'nb'; its fields: "
                    "id, en (choose one with --completion-field)"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no output, no .partial, no created parent


def _refused(tokenizer_dir, inputs, out, message, **kwargs):
    kwargs = {**FIELDS, **kwargs}
    with pytest.raises(DataError) as info:
        prepare_data(tokenizer_dir, inputs, out, SEQ_LEN, workers=1, progress=False, **kwargs)
    assert str(info.value) == message and "\n" not in message
    assert not os.path.exists(out) and not os.path.exists(os.path.join(os.path.dirname(out), ".out.partial"))


def test_bad_records_and_settings_are_one_line_errors(tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path / "out")
    null = str(tmp_path / "null.parquet")
    pq.write_table(pa.table({"en": ["a", "b", "c"], "nb": [" x", None, " z"]}), null)
    _refused(tokenizer_dir, [null], out, f"{null}: row 1: column 'nb' is None, expected a string")
    nocol = str(tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"en": ["a"], "no": ["b"]}), nocol)
    _refused(tokenizer_dir, [nocol], out, f"{nocol}: no column 'nb' (columns: en, no); choose one with "
             "--completion-field")
    number = tmp_path / "number.jsonl"
    number.write_text('{"en": "a", "nb": " b"}\n{"en": 5, "nb": " c"}\n')
    _refused(tokenizer_dir, [str(number)], out, f"{number}:2: expected a JSON object with a string field 'en'; "
             "it is 5")
    text = tmp_path / "plain.txt"
    text.write_text("some text\n")
    _refused(tokenizer_dir, [str(text)], out, f"{text}: a .txt file holds plain text, not en/nb records (give "
             "those as .jsonl or .parquet)")
    _refused(tokenizer_dir, [str(number)], out, "--template 'Engelsk:' has no {0} placeholder: the prompt would "
             "be dropped", template="Engelsk:")
    _refused(tokenizer_dir, [str(number)], out, "--prompt-field and --completion-field are both 'en'; name two "
             "fields", completion_field="en")
    _refused(tokenizer_dir, [str(number)], out, "--text-column is for plain text; prompt/completion records are "
             "read with --prompt-field and --completion-field", text_column="body")
