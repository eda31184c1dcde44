"""The Hugging Face <-> JAX weight table and the layout change of each tensor.

Inside:
- `WEIGHT_RULES`: the one table mapping each Hugging Face key pattern to a model-state path and an
  explicit layout change; `expected_hf_tensors(config)` expands it for a config (one entry per HF key,
  with the JAX slice shape).
- `HFTensor.to_jax` / `to_hf`: the layout change of one tensor; `HFTensor.read_box`: one box of the JAX
  layout read from the files, reading only the Hugging Face slice that covers it; `check_files`: every header check
  (missing, unexpected, duplicate keys, shapes, dtypes) against a config, before any tensor is read.
- `ConvertError`: every mismatch, as one line naming the file and the tensor.

Layouts. transformers' Linear stores W [out, in]; ours are [in, out] with heads split out:
q [D, N, H], k/v [D, K, H], o [N, H, D], gate/up [D, F], down [F, D], lm_head [D, V]. A "linear" rule
is W.T reshaped to the JAX shape; its inverse reshapes to [in, out] and transposes. Per-layer tensors
go into slice i of the [L, ...] stacks.

Sliced reads (`read_box`, what a sharded load does on each host). A box of a "linear" tensor's JAX
layout is a box of the HF matrix: its output dims flatten to a range of HF rows, its input dims to a range
of HF columns. Those ranges are contiguous when, in each group, every dim after the first one the box
spans more than one index of is whole (true of every sharding the rules make: heads are split, head_dim
never is); otherwise the read is widened to the contiguous cover and trimmed after the transpose.
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

    def read_box(self, get_slice, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        """The JAX-layout box [(start, stop) per dim of jax_shape] of this tensor; get_slice(index) reads a
        box of the HF tensor (`WeightFiles.get_slice` bound to its name)."""
        if self.rule.in_dims is None:
            return get_slice(tuple(slice(a, b) for a, b in box))
        k = self.rule.in_dims
        in_range, in_wide, in_rel = _flat_cover(self.jax_shape[:k], box[:k])
        out_range, out_wide, out_rel = _flat_cover(self.jax_shape[k:], box[k:])
        w = get_slice((slice(*out_range), slice(*in_range)))  # HF [out, in]
        return w.T.reshape(in_wide + out_wide)[in_rel + out_rel]

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        """The HF layout of the tensor, or of a block of its HF rows (a `rows_box` of the JAX layout)."""
        if self.rule.in_dims is None:
            return w
        _, in_dim = self.hf_shape
        return w.reshape(in_dim, -1).T

    @property
    def row_unit(self) -> int:
        """HF rows come in blocks of this many for `rows_box` (the rows of one index of the first output dim)."""
        k = self.rule.in_dims
        if k is None:
            return 1
        return int(np.prod(self.jax_shape[k + 1:], dtype=np.int64))

    def rows_box(self, start: int, stop: int) -> tuple[tuple[int, int], ...]:
        """The JAX-layout box holding HF rows [start, stop) (multiples of `row_unit`, or the end)."""
        k = 0 if self.rule.in_dims is None else self.rule.in_dims
        unit = self.row_unit
        if start % unit or (stop % unit and stop != self.hf_shape[0]):
            raise ValueError(f"rows [{start}, {stop}) of {self.rule.hf} are not whole blocks of {unit}")
        box = [(0, n) for n in self.jax_shape]
        if box:
            box[k] = (start // unit, -(-stop // unit))
        return tuple(box)


def _flat_cover(shape, box):
    """The contiguous range of flat (row-major) indices covering `box` of an array of `shape`: (range, the
    widened box's shape, the box's slices within it). Dims after the first one the box spans more than
    one index of are widened to whole (no-op for the shardings the rules make)."""
    spans = [b - a for a, b in box]
    first = next((j for j, n in enumerate(spans) if n > 1), len(box) - 1)
    wide = [(a, b) if j <= first else (0, n) for j, ((a, b), n) in enumerate(zip(box, shape))]
    lo = int(np.ravel_multi_index([a for a, _ in wide], shape)) if shape else 0
    wide_shape = tuple(b - a for a, b in wide)
    rel = tuple(slice(a - wa, b - wa) for (a, b), (wa, _) in zip(box, wide))
    return (lo, lo + int(np.prod(wide_shape, dtype=np.int64))), wide_shape, rel


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
