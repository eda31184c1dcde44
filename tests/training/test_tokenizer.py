"""The NorMistral-style tokenizer: fixed special ids, BOS, exact round trips, piece length, newline tokens."""

import json
import os
import random
import unicodedata

import pytest

from jaxmodel.storage import StorageError
from tests.training.conftest import TRAIN_FILES
from training.documents import DataError, iter_documents
from training.tokenizer import MAX_TOKEN_LENGTH, SPECIAL_TOKENS, train_tokenizer

TRICKY = [
    "",
    "Hei",
    "Hei, verden!",
    " leading space",
    "trailing space ",
    "  two leading and two trailing  ",
    "\n",
    "\n\n",
    "\n\n\n\n",
    "\nstarts with a newline",
    "ends with a newline\n",
    "\nboth\n",
    "one\ntwo",
    "one\n\ntwo",
    "one\n\n\n\ntwo",
    "space before newline \nnext",
    "space after newline\n next",
    "\n \n \n",
    " \n",
    "tabs\tand\t\ttabs\n\t indented",
    "Blåbærsyltetøy på skiva. ÆØÅ æøå Ææ Øø Åå",
    "Sámi: á č đ ŋ š ŧ ž Á Č Đ Ŋ Š Ŧ Ž",
    "Mun hálan sámegiela. Čáhci lea čoaskkis. Guovdageaidnu, Kárášjohka.",
    "Engelsk: I am hungry.\nBokmål: Jeg er sulten.\n",
    "Tall: 0 1 12 123 1234 12345 3,14 1.000.000 -7 20%",
    "Tegn: () [] {} <> «sitat» „anførsel“ – — … ¿? ¡! @#$%^&*_+=|\\/~`'\"",
    "Emoji 🙂🎉 og CJK 日本語 og arabisk مرحبا",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "- liste\n- med\n- punkter\n\nog en ny avsnitt",
    "\u00a0 is NFKC-folded to a space, so this string is skipped below",
]


def _round_trip(tok, text: str) -> str:
    return tok.decode(tok(text)["input_ids"], skip_special_tokens=True)


def test_special_tokens_have_fixed_ids(tok):
    assert SPECIAL_TOKENS[:5] == ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(16))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 4)
    assert tok.convert_ids_to_tokens(list(range(5, 16))) == [f"<special_{i}>" for i in range(11)]


def test_directory_is_a_plain_hugging_face_tokenizer(tokenizer_dir):
    assert sorted(os.listdir(tokenizer_dir)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert "auto_map" not in config  # loads without trust_remote_code
    assert config["model_max_length"] == 32768


def test_bos_is_prepended_and_eos_is_not(tok):
    ids = tok("Hei på deg")["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 1 and 2 not in ids
    assert tok("")["input_ids"] == [1]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact_on_tricky_strings(tok, text):
    if unicodedata.normalize("NFKC", text) != text:
        assert _round_trip(tok, text) == unicodedata.normalize("NFKC", text)
    else:
        assert _round_trip(tok, text) == text


def test_round_trip_is_exact_on_random_corpus_strings(tok):
    rng = random.Random(0)
    lines = [line for path in TRAIN_FILES for doc in iter_documents(path) for line in doc.split("\n") if line]
    alphabet = "abcæøåÆØÅáčđŋšŧžÁČ ĐŊŠŦŽ019.,;:!?-–«»\"'()\n\t " + "".join(chr(c) for c in range(0x20, 0x7f))
    for _ in range(300):
        pieces = [rng.choice(lines)[rng.randrange(0, 10):] for _ in range(rng.randint(1, 4))]
        text = "".join(p + rng.choice(["", " ", "\n", "\n\n", " \n", "\n ", "\n\n\n"]) for p in pieces)
        noise = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for sample in (text, noise, rng.choice(["", "\n", " "]) + text + noise):
            if unicodedata.normalize("NFKC", sample) == sample:
                assert _round_trip(tok, sample) == sample, repr(sample)


def test_special_token_text_is_text_when_asked(tok):
    # Hugging Face tokenizers parse "<s>" in the input as the special token (prepare_data turns that off).
    text = "<s> looks special but is text </s>"
    assert tok(text)["input_ids"][:2] == [1, 1]
    ids = tok(text, split_special_tokens=True)["input_ids"]
    assert ids.count(1) == 1 and 2 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_nfkc_is_applied(tok):
    assert tok("ﬁne")["input_ids"] == tok("fine")["input_ids"]  # the fi ligature folds to "fi"


def test_no_piece_is_longer_than_24_characters(tok):
    specials = set(SPECIAL_TOKENS)
    pieces = [t for t in tok.convert_ids_to_tokens(list(range(len(tok)))) if t not in specials]
    assert len(pieces) == len(tok) - 16
    assert max(len(t) for t in pieces) <= MAX_TOKEN_LENGTH


def test_vocabulary_has_the_requested_size_and_common_words(tok):
    assert len(tok) == 2048
    assert len(tok("og")["input_ids"]) == 2  # <s> + " og": frequent words are one token, with their space


def test_newline_stop_set_is_not_empty(tok):
    # The model card's recipe for stopping generation at the end of a line.
    stop = [i for i in range(tok.vocab_size) if "\n" in tok.decode([i])]
    assert stop and tok("\n")["input_ids"][-1] in stop


def test_training_takes_seconds(trained_tokenizer):
    assert trained_tokenizer[1] < 30  # typically about one second; generous for a loaded machine


def test_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        train_tokenizer([str(tmp_path / "missing.txt")], str(tmp_path / "out"))
    with pytest.raises(DataError, match="below 272"):
        train_tokenizer(TRAIN_FILES[:1], str(tmp_path / "out"), vocab_size=100)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(StorageError, match="already exists and is not empty"):
        train_tokenizer(TRAIN_FILES[:1], str(tmp_path / "full"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with a string field 'text'$"):
        train_tokenizer([str(bad)], str(tmp_path / "out2"))
