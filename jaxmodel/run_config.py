"""YAML run configs: loading, `--set key=value` overrides, and the model and mesh sections.

Inside: `load_run_config(path, overrides)`, `model_config(section)`, `mesh_shape(section)`,
`ConfigError` for every problem (one line naming the file and key); `find_config(name_or_path)`,
`bundled_config_dir()`, `bundled_configs()`.

A config is named by its file path or by the name of a bundled one (`tiny-cpu` or `tiny-cpu.yaml`): the
files in the repository's `configs/` ship inside the package (installed as the `normistral_configs`
package, see setup.py), so `normistral train --config tiny-cpu` works from any directory after a plain
`pip install`. An existing file wins over a bundled name.

A run config is one YAML file with sections; each package reads its own (`model` and `mesh` here,
`train`, `data`, `checkpoint` in training/, `inference` in inference/), each into a small frozen
dataclass, and an unknown key is an error rather than silently ignored.

model section: `preset` (a MistralConfig preset name) or `hf_config` (a config.json or a directory
holding one), plus any MistralConfig field as an override (dtype, param_dtype, attention_impl, remat,
scan_layers, or architecture fields for toy models).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from jaxmodel.config import ConfigError, MistralConfig
from jaxmodel.sharding import MeshShape

PRESETS = {
    "normistral_11b_long": MistralConfig.normistral_11b_long,
    "bench_64m": MistralConfig.bench_64m,
    "tiny": MistralConfig.tiny,
}


def _set(tree: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: --set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def bundled_config_dir() -> str:
    """Where the bundled configs are: the installed `normistral_configs` package, or the checkout's configs/."""
    import importlib.util

    spec = importlib.util.find_spec("normistral_configs")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def bundled_configs() -> list[str]:
    """The bundled config names (file names without .yaml)."""
    folder = bundled_config_dir()
    return sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".yaml")) if os.path.isdir(folder) else []


def find_config(name: str) -> str:
    """The file for a config path or a bundled config name (with or without .yaml, or configs/NAME.yaml)."""
    if os.path.isfile(name):
        return name
    base = os.path.basename(name)
    base = base[:-5] if base.endswith(".yaml") else base
    if os.path.dirname(name) in ("", "configs") and base in bundled_configs():
        return os.path.join(bundled_config_dir(), base + ".yaml")
    raise ConfigError(f"{name}: config file not found (bundled configs: {', '.join(bundled_configs())})")


def load_run_config(path: str, overrides: list[str] = ()) -> dict:
    """The parsed YAML with `key.sub=value` overrides applied (values parsed as YAML scalars). `path` is
    a file or a bundled config name (see find_config)."""
    path = find_config(path)
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        _set(tree, key.strip(), yaml.safe_load(raw), path)
    tree["_path"] = os.path.abspath(path)
    return tree


def section(tree: dict, name: str) -> dict:
    value = tree.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{tree.get('_path', 'config')}: section {name!r} must be a mapping")
    return dict(value)


def model_config(tree: dict) -> MistralConfig:
    where = tree.get("_path", "config")
    sec = section(tree, "model")
    preset, hf_config = sec.pop("preset", None), sec.pop("hf_config", None)
    fields = {f.name for f in dataclasses.fields(MistralConfig)}
    for key in sec:
        if key not in fields:
            raise ConfigError(f"{where}: model.{key} is not a MistralConfig field")
    if (preset is None) == (hf_config is None):
        raise ConfigError(f"{where}: model section needs exactly one of preset or hf_config")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{where}: model.preset {preset!r} is not one of {sorted(PRESETS)}")
        return PRESETS[preset]().replace(**sec)
    if not os.path.isabs(hf_config):
        hf_config = os.path.join(os.path.dirname(where), hf_config)
    return MistralConfig.from_hf(hf_config).replace(**sec)


def from_section(cls, tree: dict, name: str):
    """A frozen dataclass from one section, refusing unknown keys."""
    sec = section(tree, name)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sec:
        if key not in names:
            raise ConfigError(
                f"{tree.get('_path', 'config')}: {name}.{key} is not a known option (known: {', '.join(sorted(names))})"
            )
    try:
        return cls(**sec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{tree.get('_path', 'config')}: section {name}: {e}") from None


def mesh_shape(tree: dict) -> MeshShape:
    return from_section(MeshShape, tree, "mesh")
