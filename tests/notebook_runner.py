"""Runs the Colab notebook's code cells in order in one namespace (no Jupyter needed).

Cells whose first line is `# colab-only` (the pip install) are skipped. Imported by
tests/inference/test_notebook.py; copied next to a fresh virtual environment and run as a script by
tests/test_wheel.py (`python notebook_runner.py NOTEBOOK` prints the translations as one JSON line).
"""

import json
import sys


def code_cells(path):
    with open(path, encoding="utf-8") as f:
        notebook = json.load(f)
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and not source.lstrip().startswith("# colab-only"):
            yield source


def run_notebook(path) -> dict:
    namespace = {"__name__": "__notebook__"}
    for i, source in enumerate(code_cells(path)):
        exec(compile(source, f"colab_inference.ipynb[code {i}]", "exec"), namespace)  # noqa: S102
    return namespace


if __name__ == "__main__":
    ns = run_notebook(sys.argv[1])
    print(json.dumps({"sentences": ns["sentences"], "translations": ns["translations"], "model": ns["MODEL"]}))
