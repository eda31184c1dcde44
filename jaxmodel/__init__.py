"""normistral-jax model package: config, Flax NNX model, attention, converters, sharding.

`jaxmodel` knows nothing of `training/` or `inference/`; both import from here.
"""

from jaxmodel.config import ConfigError, MistralConfig
from jaxmodel.convert import ConvertError, export_hf, from_pretrained, import_hf, save_pretrained
from jaxmodel.model import MistralForCausalLM, abstract_model, init_model

__all__ = [
    "ConfigError",
    "ConvertError",
    "MistralConfig",
    "MistralForCausalLM",
    "abstract_model",
    "export_hf",
    "from_pretrained",
    "import_hf",
    "init_model",
    "save_pretrained",
]
