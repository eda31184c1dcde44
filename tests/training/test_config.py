"""Run-config resolution: `model.init_from` as a Hugging Face model id (offline, a hub cache laid out by hand).

The tiny checkpoint sits in a temporary HF_HOME as `test-org/tiny-init` (tests/hub_cache.py) with
HF_HUB_OFFLINE=1; the trainer's initial state must hold exactly the file's tensors (read here with the
`safetensors` package, not our loader)."""

import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxmodel.config import MistralConfig
from jaxmodel.hub import HubError
from jaxmodel.parity import make_hf_checkpoint
from jaxmodel.sharding import make_mesh
from tests.hub_cache import make_hub_cache
from training import config as train_config
from training import step as steps_lib
from training.train import _check_init_from, initial_state

REPO = "test-org/tiny-init"
CONFIG = MistralConfig.tiny(num_hidden_layers=2, vocab_size=512)
TRAIN = {"steps": 1, "global_batch_size": 4, "seq_len": 16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_init") / "hf")
    make_hf_checkpoint(path, CONFIG, seed=5)
    return path


@pytest.fixture
def offline_hub(checkpoint, tmp_path, monkeypatch):
    home = str(tmp_path / "hf_home")
    make_hub_cache(home, REPO, checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def _tree(tmp_path, init_from, **model):
    return {"_path": str(tmp_path / "run.yaml"), "train": dict(TRAIN),
            "model": {"init_from": init_from, "dtype": "float32", "attention_impl": "xla", **model}}


def _embedding_and_head(run):
    ts = steps_lib.setup(run, make_mesh((1, 2, 2), devices=jax.devices()[:4]))
    params = initial_state(ts, run)["params"]
    return np.asarray(params["embed_tokens"]), np.asarray(params["lm_head"])


def test_init_from_hub_id_trains_from_the_cached_snapshot(offline_hub, checkpoint, tmp_path):
    run = train_config.load(_tree(tmp_path, REPO))
    assert run.init_from == REPO  # kept as the id: fetched when the trainer loads it
    assert run.model.to_hf() == CONFIG.replace(dtype="float32", attention_impl="xla").to_hf()  # its config.json
    embed, head = _embedding_and_head(run)
    files = load_file(os.path.join(checkpoint, "model.safetensors"))
    np.testing.assert_array_equal(embed, files["model.embed_tokens.weight"])
    np.testing.assert_array_equal(head, files["lm_head.weight"].T)


def test_directory_beside_the_yaml_wins_over_the_hub_id(offline_hub, checkpoint, tmp_path):
    beside = tmp_path / "test-org" / "tiny-init"
    make_hf_checkpoint(str(beside), CONFIG, seed=6)
    run = train_config.load(_tree(tmp_path, REPO))
    assert run.init_from == str(beside)
    embed, _ = _embedding_and_head(run)
    np.testing.assert_array_equal(embed, load_file(str(beside / "model.safetensors"))["model.embed_tokens.weight"])


def test_init_from_id_not_cached_offline_is_one_line(offline_hub, tmp_path):
    # Without a preset the architecture comes from the id's config.json: fetched (here: refused) at load.
    with pytest.raises(HubError, match=r"^test-org/absent \(.*\): not in the local cache .* HF_HUB_OFFLINE"):
        train_config.load(_tree(tmp_path, "test-org/absent"))
    # With a preset, loading the config fetches nothing (compile-check never opens the weights); the
    # trainer's check before building data names the id.
    run = train_config.load(_tree(tmp_path, "test-org/absent", preset="tiny"))
    assert run.init_from == "test-org/absent"
    with pytest.raises(HubError, match=r"run\.yaml.*: model\.init_from test-org/absent \(.*\): not in the local cache"):
        _check_init_from(run)
