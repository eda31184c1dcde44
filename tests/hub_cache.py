"""A Hugging Face hub cache laid out by hand (no network): what `huggingface_hub.snapshot_download` leaves.

`make_hub_cache(hf_home, repo_id, src_dir)` copies a model directory into
`HF_HOME/hub/models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
refs/main}` and returns the commit hash. Used by the hub-id tests, the notebook test and the wheel test.
"""

import contextlib
import hashlib
import os
import shutil

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(hf_home: str, repo_id: str, src_dir: str, commit: str = COMMIT) -> str:
    repo = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if not os.path.isfile(src):
            continue
        with open(src, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        blob = os.path.join(repo, "blobs", digest)
        if not os.path.exists(blob):
            shutil.copy(src, blob)
        link = os.path.join(snapshot, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", "..", "blobs", digest), link)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return commit


@contextlib.contextmanager
def offline_hub():
    """No network for the block: hub ids and datasets come from the caches only. huggingface_hub and
    datasets read these variables once, at their import, so their flags are set too (a module-level
    HF_HUB_OFFLINE would leak into every later test)."""
    import datasets.config
    import huggingface_hub.constants
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield
