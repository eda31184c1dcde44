"""Hugging Face model ids, offline: a hub cache laid out by hand, HF_HUB_OFFLINE=1, a temporary HF_HOME.

The tiny checkpoint (with its tokenizer) is placed in the cache as `test-org/tiny-normistral`; loading it
by id must give exactly what loading the directory gives, through the Python API and `normistral generate`.
The errors online (an id not on the hub, a gated one) come from a local HTTP server that answers as the hub
does (HF_ENDPOINT), so huggingface_hub's own error parsing decides what we report.
"""

import http.server
import json
import os
import shutil
import threading
import urllib.parse

import huggingface_hub
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


# -- online errors: a local server answering as the Hugging Face Hub does ---------------------------------

MISSING, GATED = "test-org/no-such-model", "test-org/gated-model"


class _Hub(http.server.BaseHTTPRequestHandler):
    """The hub's answers for the two failures (status codes and X-Error-Code headers as huggingface.co
    sends them; huggingface_hub's `hf_raise_for_status` turns them into its error types):
    - a repository that does not exist: its model info (`/api/models/ID/revision/REV`) answers 401
      (anonymous) or 404 (with a token), `X-Error-Code: RepoNotFound`;
    - a gated repository: its model info and file listing are public, each file (`/ID/resolve/REV/FILE`)
      answers 401 (anonymous) or 403 (a token without access), `X-Error-Code: GatedRepo`."""

    status = {"missing": 401, "gated": 401}

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value):
        self._send(200, json.dumps(value).encode(), [("Content-Type", "application/json")])

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith(f"/api/models/{MISSING}/"):
            self._send(self.status["missing"], b'{"error":"Repository not found"}',
                       [("X-Error-Code", "RepoNotFound"), ("X-Error-Message", "Repository not found")])
        elif path == f"/api/models/{GATED}/revision/main":
            self._json({"id": GATED, "modelId": GATED, "sha": COMMIT, "private": False, "gated": "manual",
                        "siblings": [{"rfilename": "config.json"}, {"rfilename": "model.safetensors"}]})
        elif path == f"/api/models/{GATED}/tree/{COMMIT}":
            self._json([{"type": "file", "path": "config.json", "size": 2, "oid": "1" * 40},
                        {"type": "file", "path": "model.safetensors", "size": 8, "oid": "2" * 40,
                         "lfs": {"oid": "3" * 64, "size": 8, "pointerSize": 130}}])
        elif path.startswith(f"/{GATED}/resolve/"):
            message = f"Access to model {GATED} is restricted. You must have access to it and be authenticated."
            self._send(self.status["gated"], json.dumps({"error": message}).encode(),
                       [("X-Error-Code", "GatedRepo"), ("X-Error-Message", message)])
        else:
            self._send(500, b"unexpected request " + path.encode())

    do_HEAD = do_GET


@pytest.fixture
def online_hub(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # empty cache, no stored token
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: online for this test whatever it was then.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield url
    server.shutdown()
    server.server_close()


def _cli_error(capsys, name) -> str:
    with pytest.raises(SystemExit) as exit_info:
        normistral.main(["generate", name, "--prompt", "Hei"])
    assert exit_info.value.code == 2
    # huggingface_hub's own download bar ("Fetching 2 files: 0%|...| 0/2 [...it/s]") may come first: it
    # is what a user sees while a real download runs; the error is the one other line.
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("Fetching ")]
    assert len(err) == 1 and err[0].startswith(f"normistral: error: {name} "), err
    return err[0]


@pytest.mark.parametrize("status", [401, 404])
def test_id_not_on_the_hub_is_one_line(online_hub, capsys, monkeypatch, status):
    monkeypatch.setitem(_Hub.status, "missing", status)
    line = _cli_error(capsys, MISSING)
    assert "not found on the hub" in line and "HF_TOKEN" in line, line
    with pytest.raises(jaxmodel.hub.HubError, match=f"^{MISSING} .*not found on the hub"):
        jaxmodel.from_pretrained(MISSING)


@pytest.mark.parametrize("status", [401, 403])
def test_gated_id_is_one_line_naming_the_license_page(online_hub, capsys, monkeypatch, status):
    monkeypatch.setitem(_Hub.status, "gated", status)
    line = _cli_error(capsys, GATED)
    assert f"gated repository; accept its license at {online_hub}/{GATED} and set HF_TOKEN" in line, line
    with pytest.raises(jaxmodel.hub.HubError, match=f"^{GATED} .*gated"):
        Generator.from_pretrained(GATED, quantize="int8")
