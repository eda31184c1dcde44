"""Peak host memory of `normistral export-hf` and of the layer-by-layer `normistral parity` on synthetic
checkpoints of growing depth.

The checkpoints are bench/convert_memory.py's (float32, hidden 1024, MLP 4096, 16/4 heads, vocab 32000;
61 MB per layer), at 8, 32 and 64 layers (0.75, 2.2 and 4.2 GB: parity's fixed cost, the torch +
transformers + JAX imports and about one layer of each model, is near a quarter of 2.2 GB by itself, so
the quarter is tested at 4.2 GB too). Each is imported once (`import-hf`, not
measured), then the real CLI runs in a child process whose peak RSS (VmHWM, polled) is read, as
bench/convert_memory.py does:
- `export-hf ORBAX_DIR OUT`: streamed from the Orbax files, tensor by tensor;
- `parity HF_DIR ORBAX_DIR --length 256`: transformers vs ours, one layer of each at a time.
The claim under test: each stays under a quarter of the checkpoint size and does not grow with the
number of layers. Run: `python bench/export_parity_memory.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402
from convert_memory import peak_rss_of, write_synthetic  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="normistral-export-bench-")
    normistral = [sys.executable, "-m", "normistral"]
    baseline, _ = peak_rss_of([sys.executable, "-c", "import jax, torch, transformers, jaxmodel.convert; "
                                                     "jax.devices()"])
    rows = []
    try:
        for layers in args.layers:
            hf, orbax, out = (os.path.join(work, f"{k}-{layers}") for k in ("hf", "orbax", "export"))
            size = write_synthetic(hf, layers)
            subprocess.run([*normistral, "import-hf", hf, orbax], check=True, capture_output=True)
            export_rss, export_s = peak_rss_of([*normistral, "export-hf", orbax, out])
            shutil.rmtree(out)
            parity_rss, parity_s = peak_rss_of([*normistral, "parity", hf, orbax, "--length", "256",
                                                "--tolerance", "1e-3"])
            rows.append({"layers": layers, "checkpoint_bytes": size,
                         "export_peak_rss_bytes": export_rss, "export_rss_over_size": export_rss / size,
                         "export_seconds": export_s,
                         "parity_peak_rss_bytes": parity_rss, "parity_rss_over_size": parity_rss / size,
                         "parity_seconds": parity_s})
            shutil.rmtree(hf), shutil.rmtree(orbax)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"bench": "export_parity_memory", "machine": machine(), "import_baseline_rss_bytes": baseline,
                      "runs": rows}))


if __name__ == "__main__":
    main()
