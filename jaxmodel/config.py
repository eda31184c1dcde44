"""MistralConfig: the one model configuration type of the project.

Inside:
- `MistralConfig`, a frozen dataclass whose architecture fields carry Hugging Face's names, plus the
  model options that only this implementation has (`dtype`, `param_dtype`, `attention_impl`, `remat`,
  `scan_layers`).
- `MistralConfig.from_hf(path_or_dict)` / `to_hf()`: read and write a transformers `config.json`
  (4.4x writes a top-level `rope_theta`, 5.x a `rope_parameters` dict; both are read).
- Presets: `normistral_11b_long()` (the real model) and small ones for tests and benchmarks.

Design choices:
- Every architecture value comes from the checkpoint's config.json; `head_dim` is read from the file and
  falls back to hidden_size // num_attention_heads only when absent (NorMistral's 128 is *not* 5120/32).
- What this implementation cannot honour (RoPE scaling variants, activations other than SiLU, attention
  biases, ...) is refused with a one-line `ConfigError` naming the field, rather than silently ignored.
- `model_type: llama` is read as transformers reads it: a `sliding_window` key there is ignored (Llama
  has none), so the model runs with full attention.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax.numpy as jnp

from jaxmodel import storage  # config.json local or on gs://
from jaxmodel.checks import json_problem

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")
# What makes two configs the same network (a checkpoint of one loads into the other); the rest are options.
ARCHITECTURE_FIELDS = (*SHAPE_FIELDS, "head_dim", "rope_theta", "rms_norm_eps", "sliding_window",
                       "tie_word_embeddings")
ATTENTION_IMPLS = ("auto", "xla", "flash", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A configuration this implementation cannot honour (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    # Architecture (Hugging Face field names).
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Model options (this implementation only).
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    attention_impl: str = "auto"
    remat: str = "none"
    scan_layers: bool = True
    # The dtype the Hugging Face checkpoint was stored in (used when exporting back).
    torch_dtype: str = "float32"

    def __post_init__(self):
        for name in (*SHAPE_FIELDS, "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"config field sliding_window must be positive or null, got {self.sliding_window}")
        for name in ("dtype", "param_dtype", "torch_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"config field {name}={getattr(self, name)!r} is not one of {sorted(_DTYPES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"config field attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"config field remat={self.remat!r} is not one of {REMAT_POLICIES}")

    # -- derived values -------------------------------------------------------------------------
    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def num_query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> MistralConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count computed from the shapes (embeddings and lm_head counted separately)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_hidden_layers * per_layer + d + head

    # -- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any], **options) -> MistralConfig:
        """Reads a transformers config.json (a file, a directory holding one, or its parsed dict).

        `options` set the implementation-only fields (dtype, attention_impl, ...)."""
        if isinstance(path_or_dict, dict):
            hf, where = dict(path_or_dict), "config dict"
        else:
            path = os.fspath(path_or_dict)
            if storage.isdir(path):
                path = storage.join(path, "config.json")
            if not storage.isfile(path):
                raise ConfigError(f"{path}: config.json not found")
            try:
                hf = storage.read_json(path)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{json_problem(e)}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{path}: not a JSON text file (expected a config.json)") from None
            if not isinstance(hf, dict):
                raise ConfigError(f"{path}: expected a JSON object (a transformers config.json)")
            where = path
        fields = _fields_from_hf(hf, where)
        try:
            return cls(**fields, **options)
        except ConfigError as e:
            if where == "config dict" or not set(fields) & set(re.findall(r"\w+", str(e))):
                raise
            raise ConfigError(f"{where}: {str(e).removeprefix('config field ')}") from None

    def to_hf(self) -> dict[str, Any]:
        """The transformers (5.x layout) config.json dict for this model."""
        return {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_theta": self.rope_theta,  # also top-level, for transformers 4.x readers
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.torch_dtype,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }

    # -- presets ------------------------------------------------------------------------------------
    @classmethod
    def normistral_11b_long(cls, **options) -> MistralConfig:
        """norallm/normistral-11b-long, as its config.json states it."""
        return cls(
            vocab_size=51200,
            hidden_size=5120,
            intermediate_size=14336,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-5,
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            torch_dtype="bfloat16",
            **options,
        )

    @classmethod
    def bench_64m(cls, **options) -> MistralConfig:
        """The 64M-parameter benchmark model (4 layers, hidden 512, NorMistral's vocabulary)."""
        return cls._scaled_down(dict(vocab_size=51200, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=64), options)

    @classmethod
    def tiny(cls, **options) -> MistralConfig:
        """A NorMistral-shaped toy (4:1 GQA, head_dim != hidden/heads) for tests and the demo."""
        return cls._scaled_down(dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=32), options)

    @classmethod
    def _scaled_down(cls, shapes: dict, options: dict) -> MistralConfig:
        """NorMistral's context, RoPE, norm and special tokens around smaller shapes; options override any."""
        base = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-5, pad_token_id=3)
        return cls(**{**base, **shapes, **options})


# Read from config.json as they are (head_dim, rope_theta, sliding_window and dtype need care, below).
_ARCH_FIELDS = (*SHAPE_FIELDS, "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id")


def _fields_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Maps a config.json dict to MistralConfig fields, refusing what cannot be honoured."""
    model_type = hf.get("model_type", "mistral")
    if model_type not in ("mistral", "llama"):
        raise ConfigError(f"{where}: model_type={model_type!r} is not a Mistral model")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported (only 'silu', SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{where}: {flag}=true is not supported (Mistral has no biases)")
    for name in SHAPE_FIELDS[:5]:
        if hf.get(name) is None:
            raise ConfigError(f"{where}: {name} is missing")
    if not isinstance(hf.get("rope_parameters") or {}, dict) or not isinstance(hf.get("rope_scaling") or {}, dict):
        raise ConfigError(f"{where}: rope_parameters and rope_scaling must be objects")

    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{where}: RoPE scaling type {rope_type!r} is not implemented (only 'default')")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))

    out = {name: hf[name] for name in _ARCH_FIELDS if name in hf}
    if "num_key_value_heads" not in hf or hf["num_key_value_heads"] is None:
        out["num_key_value_heads"] = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    try:
        out["head_dim"] = head_dim if head_dim else hf["hidden_size"] // hf["num_attention_heads"]
        out["rope_theta"] = float(theta)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ConfigError(f"{where}: hidden_size, num_attention_heads and rope_theta must be numbers") from None
    # transformers' Llama has no sliding window: LlamaConfig keeps a stray `sliding_window` key as an
    # attribute that its attention never reads, so a Llama checkpoint attends to everything, as here.
    out["sliding_window"] = hf.get("sliding_window") if model_type == "mistral" else None
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise ConfigError(f"{where}: dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    out["torch_dtype"] = dtype
    return out
