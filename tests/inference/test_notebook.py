"""The Colab notebook runs end to end, loading its model by hub id from a hub cache laid out by hand.

The tiny checkpoint sits in a temporary HF_HOME under the notebook's own id (`norallm/normistral-11b-long`),
with HF_HUB_OFFLINE=1: the notebook's code is run unchanged (tests/notebook_runner.py skips only the
`# colab-only` install cell), int8 weights as it defaults to; its Serve section's port comes from
NORMISTRAL_PORT. tests/test_wheel.py runs it again from a wheel installed into a fresh virtual environment.
"""

import os
import socket

from tests.hub_cache import make_hub_cache
from tests.notebook_runner import code_cells, run_notebook

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", "colab_inference.ipynb")


def test_notebook_translates_a_batch_by_hub_id_and_serves(tiny_dir, tmp_path, monkeypatch):
    make_hub_cache(str(tmp_path), "norallm/normistral-11b-long", tiny_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("NORMISTRAL_MODEL", raising=False)
    monkeypatch.delenv("NORMISTRAL_QUANTIZE", raising=False)
    with socket.socket() as s:  # the Serve section's port
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("NORMISTRAL_PORT", str(s.getsockname()[1]))
    assert len(list(code_cells(NOTEBOOK))) >= 4
    namespace = run_notebook(NOTEBOOK)
    assert namespace["MODEL"] == "norallm/normistral-11b-long" and namespace["QUANTIZE"] == "int8"
    assert len(namespace["translations"]) == len(namespace["sentences"])
    assert type(namespace["generator"].model.lm_head[...]).__name__ == "QArray"
    assert isinstance(namespace["served"], str) and namespace["streamed"] == namespace["served"]
    assert namespace["served"].strip() == namespace["translations"][1]  # the server and Generator agree
