"""Shared fixtures for the training tests: the bundled corpus and one tokenizer trained on it per session."""

import os
import time

import pytest

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "training", "corpus")
TRAIN_FILES = [os.path.join(CORPUS, name) for name in
               ("nb.jsonl", "nn.jsonl", "se.jsonl", "en.jsonl", "translation_pairs.jsonl")]


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory):
    """(directory, seconds it took to train) of a 2048-token tokenizer trained on the bundled corpus."""
    from training.tokenizer import train_tokenizer

    out = str(tmp_path_factory.mktemp("tokenizer") / "tok")
    t0 = time.perf_counter()
    train_tokenizer(TRAIN_FILES, out, vocab_size=2048)
    return out, time.perf_counter() - t0


@pytest.fixture(scope="session")
def tokenizer_dir(trained_tokenizer):
    return trained_tokenizer[0]


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)
