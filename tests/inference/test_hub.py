"""Hugging Face model ids, offline: a hub cache laid out by hand, HF_HUB_OFFLINE=1, a temporary HF_HOME.

The tiny checkpoint (with its tokenizer) is placed in the cache as `test-org/tiny-normistral`; loading it
by id must give exactly what loading the directory gives, through the Python API and `normistral generate`.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodel
import normistral
from inference import Generator
from jaxmodel.hub import is_hub_id, resolve_model
from tests.hub_cache import COMMIT, make_hub_cache

REPO = "test-org/tiny-normistral"


@pytest.fixture(scope="module")
def hub_home(tiny_dir, tmp_path_factory):
    home = str(tmp_path_factory.mktemp("hf_home"))
    make_hub_cache(home, REPO, tiny_dir)
    return home


@pytest.fixture
def offline(hub_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", hub_home)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return hub_home


def _params(model):
    from flax import nnx

    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.split(model)[1])}


def test_hub_id_resolves_to_the_cached_snapshot(offline):
    expected = os.path.join(offline, "hub", "models--test-org--tiny-normistral", "snapshots", COMMIT)
    assert resolve_model(REPO) == expected
    assert resolve_model(f"{REPO}@{COMMIT}") == expected  # a pinned revision
    assert resolve_model(REPO, revision="main") == expected
    assert is_hub_id(REPO) and not is_hub_id("/abs/path") and not is_hub_id("gs://bucket/model")


def test_from_pretrained_by_hub_id_matches_the_directory(offline, tiny_dir):
    by_id, by_dir = _params(jaxmodel.from_pretrained(REPO, progress=False)), _params(
        jaxmodel.from_pretrained(tiny_dir, progress=False))
    assert by_id.keys() == by_dir.keys()
    for key in by_dir:
        np.testing.assert_array_equal(by_id[key], by_dir[key])


def test_generator_by_hub_id_int8(offline, tiny_dir):
    prompts = ["Hei på deg", "Engelsk: I like cheese.\nBokmål:"]
    by_id = Generator.from_pretrained(REPO, dtype=jnp.float32, quantize="int8")
    by_dir = Generator.from_pretrained(tiny_dir, dtype=jnp.float32, quantize="int8")
    assert by_id.generate(prompts, max_new_tokens=6) == by_dir.generate(prompts, max_new_tokens=6)


def test_generate_cli_by_hub_id(offline, tiny_dir, capsys):
    normistral.main(["generate", REPO, "--prompt", "Hei på deg", "Nordavind", "--max-new-tokens", "5",
                     "--dtype", "float32", "--tokenizer", REPO])
    printed = [json.loads(x)["output"] for x in capsys.readouterr().out.splitlines()]
    expected = Generator.from_pretrained(tiny_dir, dtype="float32").generate(["Hei på deg", "Nordavind"],
                                                                              max_new_tokens=5)
    assert printed == expected


@pytest.mark.parametrize("name", ["test-org/not-cached", f"{REPO}@v9.9"])
def test_id_not_cached_offline_is_one_line(offline, capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        normistral.main(["generate", name, "--prompt", "Hei"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"normistral: error: {name} "), err
    assert "HF_HUB_OFFLINE" in err[0] and "not in the local cache" in err[0]
    with pytest.raises(jaxmodel.hub.HubError, match="not in the local cache"):
        jaxmodel.from_pretrained(name)


def test_local_directory_wins_over_hub_id(offline, tiny_dir, tmp_path, monkeypatch):
    # "test-org/not-cached" is not in the cache; a local directory of that name is read instead.
    shutil.copytree(tiny_dir, tmp_path / "test-org" / "not-cached")
    monkeypatch.chdir(tmp_path)
    model = jaxmodel.from_pretrained("test-org/not-cached", progress=False)
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]),
                                  np.asarray(jaxmodel.from_pretrained(tiny_dir, progress=False).lm_head[...]))
