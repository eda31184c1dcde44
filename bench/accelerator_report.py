"""The report of bench/accelerator.py: its columns, the table printed last on stdout, the header lines above
it, and the JSON file.

Inside: `COLUMNS` (the keys of every row dict, in table order) and `HEADERS` (their titles), `table(rows,
layers)` (a Markdown table), `header(result)` (device, versions, ceilings, datasheet), `write_json(path,
result)` (whole or not at all: a temporary file beside it, renamed), `versions()` (the installed versions
that explain a run's numbers). No JAX here: plain data in, text out.
"""

import json
import os

COLUMNS = ("part", "config", "first_call_s", "layer_ms", "step_ms", "tokens_per_s", "mfu", "mfu_datasheet",
           "bw_fraction", "bw_fraction_datasheet", "torch_ratio", "status")
HEADERS = ("part", "configuration", "1st call s", "ms/layer", "ms/step ({L} layers)", "tok/s/chip", "MFU meas",
           "MFU sheet", "BW meas", "BW sheet", "torch/ours", "status")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def table(rows: list[dict], layers: int) -> str:
    lines = ["| " + " | ".join(h.format(L=layers) for h in HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def header(result: dict) -> str:
    c = result["ceilings"]
    sheet = result["datasheet"]
    peak = f"{sheet['bf16_flops'] / 1e12:.0f} TFLOP/s, {sheet['bytes_per_s'] / 1e12:.2f} TB/s" \
        if sheet["bf16_flops"] else "n/a (device kind not in the table)"
    return "\n".join([
        f"device: {result['device_kind']} ({result['platform']}), JAX {result['jax']}, {result['date']}, "
        f"plan {result['plan']}, {result['layers']} layers extrapolated from {result['layer_counts']}",
        f"measured: bf16 matmul {c['matmul_n']}^3 {c['matmul_flops'] / 1e12:.2f} TFLOP/s, copy "
        f"{c['copy_bytes_per_s'] / 1e12:.3f} TB/s; datasheet: {peak}; torch: {result['torch']}",
    ])


def write_json(path: str, result: dict) -> None:
    """Whole or not at all: a temporary file beside it, renamed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def versions() -> dict:
    """The installed versions that explain a run's numbers (absent ones left out)."""
    from importlib import metadata

    names = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "flax", "optax", "torch",
             "transformers", "numpy")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
