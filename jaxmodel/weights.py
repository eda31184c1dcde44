"""The Hugging Face <-> JAX weight table and the layout change of each tensor.

Inside:
- `WEIGHT_RULES`: the one table mapping each Hugging Face key pattern to a model-state path and an
  explicit layout change; `expected_hf_tensors(config)` expands it for a config (one entry per HF key,
  with the JAX slice shape).
- `HFTensor.to_jax` / `to_hf`: the layout change of one tensor; `check_files`: every header check
  (missing, unexpected, duplicate keys, shapes, dtypes) against a config, before any tensor is read.
- `ConvertError`: every mismatch, as one line naming the file and the tensor.

Layouts. transformers' Linear stores W [out, in]; ours are [in, out] with heads split out:
q [D, N, H], k/v [D, K, H], o [N, H, D], gate/up [D, F], down [F, D], lm_head [D, V]. A "linear" rule
is W.T reshaped to the JAX shape; its inverse reshapes to [in, out] and transposes. Per-layer tensors
go into slice i of the [L, ...] stacks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from flax import nnx

from jaxmodel.config import MistralConfig
from jaxmodel.model import abstract_model
from jaxmodel.safetensors_io import WeightFiles


class ConvertError(ValueError):
    """A checkpoint that does not match its config or our model; the message names file and tensor."""


@dataclass(frozen=True)
class WeightRule:
    hf: str  # key pattern; {i} is the layer index
    path: tuple[str, ...]  # path in the model state
    in_dims: int | None  # None: same layout; k: a Linear whose input is the first k JAX dims


WEIGHT_RULES = (
    WeightRule("model.embed_tokens.weight", ("embed_tokens",), None),
    WeightRule("model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "weight"), None),
    WeightRule("model.layers.{i}.self_attn.q_proj.weight", ("layers", "self_attn", "q_proj"), 1),
    WeightRule("model.layers.{i}.self_attn.k_proj.weight", ("layers", "self_attn", "k_proj"), 1),
    WeightRule("model.layers.{i}.self_attn.v_proj.weight", ("layers", "self_attn", "v_proj"), 1),
    WeightRule("model.layers.{i}.self_attn.o_proj.weight", ("layers", "self_attn", "o_proj"), 2),
    WeightRule(
        "model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "weight"), None
    ),
    WeightRule("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate_proj"), 1),
    WeightRule("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up_proj"), 1),
    WeightRule("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down_proj"), 1),
    WeightRule("model.norm.weight", ("norm", "weight"), None),
    WeightRule("lm_head.weight", ("lm_head",), 1),
)
# Buffers some older checkpoints carry that are recomputed, never loaded.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass(frozen=True)
class HFTensor:
    rule: WeightRule
    layer: int | None
    jax_shape: tuple[int, ...]  # the slice shape (without the layer axis)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.rule.in_dims is None:
            return self.jax_shape
        k = self.rule.in_dims
        return (int(np.prod(self.jax_shape[k:])), int(np.prod(self.jax_shape[:k])))

    def to_jax(self, w: np.ndarray) -> np.ndarray:
        return w if self.rule.in_dims is None else w.T.reshape(self.jax_shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self.rule.in_dims is None:
            return w
        out_dim, in_dim = self.hf_shape
        return w.reshape(in_dim, out_dim).T


def param_shapes(config: MistralConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    _, state = nnx.split(abstract_model(config))
    return {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def expected_hf_tensors(config: MistralConfig) -> dict[str, HFTensor]:
    """Every Hugging Face key the config implies, with its rule and the JAX slice shape."""
    shapes = param_shapes(config)
    out = {}
    for rule in WEIGHT_RULES:
        if rule.path not in shapes:  # lm_head of a tied model
            continue
        shape = shapes[rule.path]
        if "{i}" in rule.hf:
            for i in range(config.num_hidden_layers):
                out[rule.hf.format(i=i)] = HFTensor(rule, i, shape[1:])
        else:
            out[rule.hf] = HFTensor(rule, None, shape)
    return out


def check_files(files: WeightFiles, expected: dict[str, HFTensor], config: MistralConfig, where: str):
    present = set(files.names())
    for name in sorted(present - set(expected)):
        if _IGNORED.fullmatch(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        raise ConvertError(
            f"{files.file_of(name)}: unexpected tensor {name} (not in a Mistral model "
            f"with {config.num_hidden_layers} layers)"
        )
    for name in expected:
        if name not in present:
            raise ConvertError(f"{where}: missing tensor {name}")
        got, want = files.shape(name), expected[name].hf_shape
        if tuple(got) != want:
            raise ConvertError(
                f"{files.file_of(name)}: tensor {name} has shape {tuple(got)}, config.json implies {want}"
            )
    for name in expected:
        dtype = files.dtype(name)
        if not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
            raise ConvertError(f"{files.file_of(name)}: tensor {name} has dtype {dtype}, expected floating point")
