"""YAML run configs: loading, `--set key=value` overrides, and the model and mesh sections.

Inside: `SECTIONS`, `load_run_config(path, overrides)`, `model_config(tree)`, `mesh_shape(tree)`,
`from_section(cls, tree, name)`, `where(tree, key)`, `check_types`, and `ConfigError` for every problem: one
line naming the culprit, `FILE:LINE` for a key from the YAML file, `--set key=value` for an override;
`find_config(name_or_path)`, `bundled_config_dir()`, `bundled_configs()`.

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
import difflib
import os
import re
from typing import Any

import yaml

from jaxmodel.checks import yaml_problem
from jaxmodel.config import ConfigError, MistralConfig
from jaxmodel.sharding import MeshShape

PRESETS = {
    "normistral_11b_long": MistralConfig.normistral_11b_long,
    "bench_64m": MistralConfig.bench_64m,
    "tiny": MistralConfig.tiny,
}


# Every section a run config may have (each package reads its own); any other top-level key is an error.
SECTIONS = ("model", "mesh", "train", "optimizer", "data", "checkpoint", "inference", "lora")
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
          "list[int]": (list,), "dict": (dict,), "Any": (object,)}


def _key_lines(text: str) -> dict[str, int]:
    """{"section.key": line number} of every mapping key in the YAML text (for error messages)."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    dotted = f"{prefix}{key.value}"
                    lines.setdefault(dotted, key.start_mark.line + 1)
                    walk(value, dotted + ".")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return lines


def where(tree: dict, dotted: str = "") -> str:
    """Where a key's value came from: `--set key=value`, `FILE:LINE`, or the file (the culprit to name)."""
    origins = tree.get("_origins", {})
    if dotted and "." not in dotted:  # a whole section: a --set of one of its keys is the likelier culprit
        overrides = [o for k, o in origins.items() if k.startswith(f"{dotted}.") and o.startswith("--set ")]
        if overrides:
            return overrides[-1]
    parts = dotted.split(".") if dotted else []
    for n in range(len(parts), 0, -1):
        origin = origins.get(".".join(parts[:n]))
        if origin:
            return origin
    return tree.get("_shown", tree.get("_path", "config"))


def _unknown(key: str, known, what: str, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(sorted(known))}"
    return f"{prefix}{key} is not {what} ({hint})"


def _set(tree: dict, dotted: str, value: Any, item: str) -> None:
    keys = dotted.split(".")
    if any(not k for k in keys):
        raise ConfigError(f"--set {item}: expected section.key=value")
    node, origin = tree, f"--set {item}"
    for n, key in enumerate(keys[:-1]):
        if key not in node:  # a section this --set creates: errors about it name the --set
            tree["_origins"][".".join(keys[:n + 1])] = origin
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: {'.'.join(keys[:n + 1])} is not a section")
    node[keys[-1]] = value
    tree["_origins"][dotted] = origin


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
    a file or a bundled config name (see find_config).

    Refuses a top-level key that is not one of SECTIONS (a misspelled `optimiser:` would otherwise drop
    the user's settings silently); errors name the file and line, or the `--set` argument."""
    shown = os.fspath(path)
    try:
        path = find_config(path)  # a file wins, then a bundled name (a directory of that name does not)
    except ConfigError:
        if os.path.isdir(path):
            raise ConfigError(f"{shown}: is a directory, expected a YAML run config file") from None
        raise
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        tree = yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{shown}:{yaml_problem(e)}" if getattr(e, "problem_mark", None)
                          else f"{shown}: {yaml_problem(e)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{shown}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    tree["_origins"] = {key: f"{shown}:{line}" for key, line in _key_lines(text).items()}
    tree["_shown"] = shown
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or e
            raise ConfigError(f"--set {item}: the value is not valid YAML ({problem})") from None
        _set(tree, key.strip(), value, item)
    for key, value in tree.items():
        if key in ("_origins", "_shown"):
            continue
        if key not in SECTIONS:
            raise ConfigError(f"{where(tree, str(key))}: {_unknown(str(key), SECTIONS, 'a section of a run config')}")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where(tree, key)}: section {key} must be a mapping of keys to values, "
                              f"got {value!r}")
    tree["_path"] = os.path.abspath(path)
    return tree


def section(tree: dict, name: str) -> dict:
    value = tree.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where(tree, name)}: section {name} must be a mapping")
    return dict(value)


def check_types(tree: dict, name: str, cls, values: dict) -> None:
    """Refuses a value whose type the dataclass field does not allow (`train.steps: ten`), naming the key."""
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        hint = hints.get(key)
        if not isinstance(hint, str):
            continue
        allowed = [t for part in hint.replace(" ", "").split("|") for t in _TYPES.get(part, (object,))]
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, tuple(allowed))
        if not ok:
            raise ConfigError(f"{where(tree, f'{name}.{key}')}: {name}.{key} must be {hint.replace('|', 'or')}, "
                              f"got {value!r}")


def model_config(tree: dict) -> MistralConfig:
    sec = section(tree, "model")
    preset, hf_config = sec.pop("preset", None), sec.pop("hf_config", None)
    fields = {f.name for f in dataclasses.fields(MistralConfig)}
    for key in sec:
        if key not in fields:
            known = fields | {"preset", "hf_config", "init_from"}
            raise ConfigError(f"{where(tree, f'model.{key}')}: {_unknown(key, known, 'a model option', 'model.')}")
    check_types(tree, "model", MistralConfig, sec)
    if preset is not None and hf_config is not None:
        culprit = "model.hf_config" if where(tree, "model.hf_config").startswith("--set") else "model.preset"
        raise ConfigError(f"{where(tree, culprit)}: model.preset and model.hf_config are both set; use one")
    if preset is None and hf_config is None:
        raise ConfigError(f"{where(tree, 'model')}: the model section needs one of preset, hf_config or init_from")
    try:
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"{where(tree, 'model.preset')}: model.preset {preset!r} is not one of "
                                  f"{sorted(PRESETS)}")
            return PRESETS[preset]().replace(**sec)
        if not isinstance(hf_config, str):
            raise ConfigError(f"{where(tree, 'model.hf_config')}: model.hf_config must be a path, got {hf_config!r}")
        if not os.path.isabs(hf_config) and "://" not in hf_config:  # a gs:// URL is taken as it is
            hf_config = os.path.join(os.path.dirname(tree.get("_path", "")), hf_config)
        return MistralConfig.from_hf(hf_config).replace(**sec)
    except ConfigError as e:
        message = str(e)
        if message.startswith("config field "):  # a MistralConfig check: name the key it came from
            named = [k for k in sec if re.search(rf"\b{re.escape(k)}\b", message)]
            named.sort(key=lambda k: not where(tree, f"model.{k}").startswith("--set"))
            key = named[0] if named else re.match(r"config field (\w+)", message).group(1)
            raise ConfigError(f"{where(tree, f'model.{key}')}: model.{message.removeprefix('config field ')}") from None
        raise


def from_section(cls, tree: dict, name: str):
    """A frozen dataclass from one section, refusing unknown keys and values of the wrong type."""
    sec = section(tree, name)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sec:
        if key not in names:
            unknown = _unknown(str(key), names, "a known option", name + ".")
            raise ConfigError(f"{where(tree, f'{name}.{key}')}: {unknown}")
    check_types(tree, name, cls, sec)
    try:
        return cls(**sec)
    except (TypeError, ValueError) as e:
        message = str(e)  # the checks name the key: "train.steps must be ..." (or "steps must be ...")
        culprit = next((k for k in sec if re.search(rf"\b{re.escape(k)}\b", message)), "")
        if culprit and message.startswith(culprit):
            message = f"{name}.{message}"
        raise ConfigError(f"{where(tree, f'{name}.{culprit}' if culprit else name)}: {message}") from None


def mesh_shape(tree: dict) -> MeshShape:
    return from_section(MeshShape, tree, "mesh")
