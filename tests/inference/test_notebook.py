"""The Colab notebook runs end to end on a tiny local checkpoint.

Its code cells are read with `json` and executed in order in one namespace (no jupyter needed); cells whose
first line is `# colab-only` (pip install, hub download) are skipped; the notebook reads its model directory
from NORMISTRAL_MODEL_DIR and its Serve section's port from NORMISTRAL_PORT.
"""

import json
import os
import socket

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", "colab_inference.ipynb")


def code_cells(path):
    with open(path, encoding="utf-8") as f:
        notebook = json.load(f)
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and not source.lstrip().startswith("# colab-only"):
            yield source


def test_notebook_translates_a_batch_and_serves(tiny_dir, monkeypatch):
    monkeypatch.setenv("NORMISTRAL_MODEL_DIR", tiny_dir)
    with socket.socket() as s:  # the Serve section's port
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("NORMISTRAL_PORT", str(s.getsockname()[1]))
    cells = list(code_cells(NOTEBOOK))
    assert len(cells) >= 3
    namespace = {"__name__": "__notebook__"}
    for i, source in enumerate(cells):
        exec(compile(source, f"colab_inference.ipynb[code {i}]", "exec"), namespace)  # noqa: S102
    assert len(namespace["translations"]) == len(namespace["sentences"])
    assert isinstance(namespace["served"], str) and namespace["streamed"] == namespace["served"]
    assert namespace["served"].strip() == namespace["translations"][1]  # the server and Generator agree
