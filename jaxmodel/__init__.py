"""normistral-jax model package: config, Flax NNX model, attention, converters, sharding.

`jaxmodel` knows nothing of `training/` or `inference/`; both import from here.
The names below load on first use (PEP 562), so `import jaxmodel.storage` (say, in a data-preparation
worker process) does not pay for importing JAX.
"""

import importlib

_EXPORTS = {
    "ConfigError": "jaxmodel.config",
    "MistralConfig": "jaxmodel.config",
    "ConvertError": "jaxmodel.convert",
    "export_hf": "jaxmodel.export",
    "from_pretrained": "jaxmodel.convert",
    "import_hf": "jaxmodel.convert",
    "save_pretrained": "jaxmodel.export",
    "MistralForCausalLM": "jaxmodel.model",
    "abstract_model": "jaxmodel.model",
    "init_model": "jaxmodel.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxmodel' has no attribute {name!r}")
