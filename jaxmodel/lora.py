"""LoRA adapters on the model's projections, and PEFT's adapter format in and out.

Inside:
- `LoraConfig` (rank, alpha, dropout, target_modules, rslora; validated on construction) and `LoraError`
  (every bad input, one line naming the value, file or tensor).
- `Adapter`: one projection's A [*in, r] and B [r, *out] (`nnx.LoRAParam`), its scale and dropout rate.
- `project(x, module, name, spec)`: the one projection helper `Attention` and `MLP` call: the base einsum
  plus, when the projection has an adapter, scale * (x @ A) @ B.
- `add_lora(model, cfg, rngs)`, `merge_lora(model)`, `has_lora(model)`, `adapters(model)`,
  `set_lora_dropout_key(model, key)`, `mirror_adapters` (`model.unstack_layers`' hook);
  `TRAINABLE` / `FROZEN`: the state filters that split a LoRA model into adapters and the frozen base.
- `save_peft_adapter(model, cfg, out_dir, base_model_name_or_path)` / `load_peft_adapter(model, path)`:
  a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) written or read;
  `check_peft_adapter(model, path)`: the same checks as loading, nothing loaded (an abstract model will do);
  `read_peft_config(path)` (its LoraConfig, checked) and `peft_config(cfg, base)` (the JSON written);
  `PeftDeltas(model, path)`: scale * A @ B of one layer's projection (or a box of it) straight from the
  adapter's files, for merging while streaming (`export_hf(merge_lora=...)`); `error_line(e, prefix, arg)`:
  a LoraError as one line naming the user's flag or argument once (`--lora DIR: ...`).

Design choices:
- The adapters are Flax NNX's own `nnx.LoRAParam` (a `Param` subclass), so `nnx.state(model,
  nnx.LoRAParam)` is exactly the trainable set and optimizers, checkpoints and `nnx.grad(...,
  nnx.DiffState(0, nnx.LoRAParam))` need nothing new. `nnx.LoRA`/`nnx.LoRALinear` are not used: they
  wrap a 2-D Linear, while our kernels keep heads as their own axes ([D, N, H]) and live in [L, ...]
  stacks. Instead each target projection gets an `Adapter` module as a sibling attribute
  (`self_attn.q_proj_lora`) whose arrays are built directly in the stack's layout ("layers" first), so
  the layer scan slices them with the base weights; on an unstacked model (`unstack_layers`, before or
  after `add_lora`) each layer holds its own. This module imports nothing of model.py (model.py imports
  `project` from here), so it reaches layers by attribute (`model.layers`, `self_attn`, `mlp`).
- Logical axes: A has the kernel's input axes + "lora_rank", B "lora_rank" + its output axes ("layers"
  first when stacked), so FSDP shards A over `embed` like the base and tensor parallelism B over heads.
- Numerics follow PEFT: A is kaiming-uniform(a=sqrt(5)) over the fan-in (uniform +-1/sqrt(in)), B zeros,
  so a fresh adapter is the identity; scale alpha/r (rsLoRA: alpha/sqrt(r)). The update is two thin
  einsums, never the merged [in, out] matrix, so the base weight may be any array type with `astype`
  (an int8/int4 QArray dequantizes there); adapters are float32 by default and cast to the compute dtype.
- Dropout (on the adapter's input only, as PEFT) runs only when a key was set with
  `set_lora_dropout_key`; without one the forward is deterministic (inference, evaluation).
- PEFT layout: a Linear stores W [out, in]; A [*in, r] is written as lora_A.weight [r, prod(in)] and
  B [r, *out] as lora_B.weight [prod(out), r] (the same flattening as the base weights' converter).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmodel import storage
from jaxmodel.safetensors_io import SafetensorsWriter, WeightFiles, read_safetensors_header

# Target name -> (the layer's submodule holding it, how many leading kernel axes are inputs).
TARGETS = {
    "q_proj": ("self_attn", 1), "k_proj": ("self_attn", 1), "v_proj": ("self_attn", 1), "o_proj": ("self_attn", 2),
    "gate_proj": ("mlp", 1), "up_proj": ("mlp", 1), "down_proj": ("mlp", 1),
}
TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PEFT_KEY = "base_model.model.model.layers.{i}.{module}.{name}.lora_{ab}.weight"
# PEFT options this loader cannot honour: each must be absent or empty/false/null in adapter_config.json.
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                "layer_replication", "rank_pattern", "alpha_pattern", "target_parameters",
                "trainable_token_indices", "use_qalora", "exclude_modules", "alora_invocation_tokens")


class LoraError(ValueError):
    """A LoRA option, adapter or adapter directory that cannot be used (one line naming the culprit)."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = tuple(TARGETS)
    rslora: bool = False

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # one name, as PEFT also accepts
            object.__setattr__(self, "target_modules", (self.target_modules,))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise LoraError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise LoraError("LoRA target_modules is empty (choose from " + " ".join(TARGETS) + ")")
        for name in self.target_modules:
            if name not in TARGETS:
                raise LoraError(f"unknown LoRA target module {name!r} (known: {' '.join(TARGETS)})")
        if len(set(self.target_modules)) != len(self.target_modules):
            raise LoraError(f"LoRA target_modules lists a module twice: {list(self.target_modules)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRADropoutKey(nnx.Variable):
    """The PRNG key(s) of an adapter's dropout (not a parameter: no gradient, no optimizer state)."""


class Adapter(nnx.Module):
    """One projection's low-rank update: scale * dropout(x) @ A @ B."""

    def __init__(self, a: nnx.LoRAParam, b: nnx.LoRAParam, scale: float, dropout: float):
        self.a, self.b, self.scale, self.dropout = a, b, scale, dropout

    def __call__(self, x, spec: str):
        a_spec, b_spec = _lora_specs(spec)
        key = getattr(self, "dropout_key", None)
        if key is not None and self.dropout > 0:  # training: inverted dropout, as torch.nn.Dropout
            keep = jax.random.bernoulli(key[...], 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        inputs, out = spec.split("->")
        x_in, w = inputs.split(",")
        kept = a_spec.split("->")[1][:-1]
        if x_in.startswith(kept) and out.startswith(kept):  # x [*kept, *in] -> [*kept, *out]: the flat form
            flat = x.reshape(-1, math.prod(a.shape[:-1]))
            y = _low_rank(flat, a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1), self.scale)
            return y.reshape(x.shape[:len(kept)] + b.shape[1:])
        z = jnp.einsum(a_spec, x, a)
        # The scale goes on the rank-r activations, the smallest tensor of the three.
        return jnp.einsum(b_spec, z * jnp.asarray(self.scale, z.dtype), b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _low_rank(x, a, b, scale: float):
    """scale * (x @ a) @ b for x [M, I], a [I, R], b [R, O]. Its own VJP: autodiff's weight gradients
    contract over M with M the major axis of both operands, and XLA CPU then copies the [M, O]
    cotangent transposed (fused into its producer, strided: a quarter of a LoRA step in bench/lora.py);
    here every product contracts a row-major operand's major axis with the transposes on the rank-R sides
    (x^T dz is taken as (dz^T x)^T)."""
    return (x @ a * jnp.asarray(scale, x.dtype)) @ b


def _low_rank_fwd(x, a, b, scale):
    z = x @ a * jnp.asarray(scale, x.dtype)
    return z @ b, (x, a, b, z)


def _low_rank_bwd(scale, saved, dy):
    x, a, b, z = saved
    dz = dy @ b.T * jnp.asarray(scale, dy.dtype)  # [M, R]
    return dz @ a.T, (dz.T @ x).T, z.T @ dy


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def _lora_specs(spec: str) -> tuple[str, str]:
    """'BTD,DNH->BTNH' -> ('BTD,DR->BTR', 'BTR,RNH->BTNH'): the kernel's input letters contract with x."""
    inputs, out = spec.split("->")
    x_in, w = inputs.split(",")
    contracted = "".join(c for c in w if c in x_in)
    produced = "".join(c for c in w if c not in x_in)
    kept = "".join(c for c in x_in if c not in contracted)
    return f"{x_in},{contracted}R->{kept}R", f"{kept}R,R{produced}->{out}"


def project(x, module: nnx.Module, name: str, spec: str):
    """x through `module.<name>` (a kernel, possibly quantized: it dequantizes in `astype`) by the einsum
    `spec`, plus the LoRA update when the projection has an adapter."""
    y = _contract(spec, x, getattr(module, name)[...].astype(x.dtype))
    adapter = getattr(module, f"{name}_lora", None)
    return y if adapter is None else y + adapter(x, spec)


def _contract(spec: str, x, w):
    """jnp.einsum(spec, x, w) for a projection (output letters: x's kept ones, then w's) as one
    dot_general contracting in x's letter order. jnp.einsum orders several contracted letters
    alphabetically: o_proj's "BTNH,NHD" contracted (H, N), and XLA CPU transposed o_proj's weight and its
    input at every call to match."""
    inputs, out = spec.split("->")
    x_in, w_in = inputs.split(",")
    contracted = [c for c in x_in if c in w_in]
    if "".join(c for c in x_in + w_in if c not in contracted) != out:
        return jnp.einsum(spec, x, w)
    dims = tuple(x_in.index(c) for c in contracted), tuple(w_in.index(c) for c in contracted)
    return jax.lax.dot_general(x, w, (dims, ((), ())))


# -- attaching, merging ---------------------------------------------------------------------------------


def _layer_groups(model) -> list[tuple[nnx.Module, int]]:
    """(layer module, number of leading stack axes): the one stacked layer, or each unstacked one."""
    if isinstance(model.layers, nnx.List):
        return [(layer, 0) for layer in model.layers]
    return [(model.layers, 1)]


def adapters(model) -> list[tuple[int | None, str, nnx.Module, Adapter]]:
    """(layer index or None when stacked, target name, its parent module, adapter) for each adapter."""
    out = []
    for k, (layer, lead) in enumerate(_layer_groups(model)):
        for name, (sub, _) in TARGETS.items():
            parent = getattr(layer, sub)
            adapter = getattr(parent, f"{name}_lora", None)
            if adapter is not None:
                out.append((None if lead else k, name, parent, adapter))
    return out


def has_lora(model) -> bool:
    return bool(adapters(model))


def _kernel_split(kernel, name: str, lead: int):
    """(leading stack dims, input dims, output dims) of a kernel's shape and of its logical axes."""
    n_in = TARGETS[name][1]
    shape, axes = tuple(kernel.shape), tuple(kernel.get_metadata().get("out_sharding") or (None,) * len(kernel.shape))
    cut = (lead, lead + n_in)
    return ((shape[:cut[0]], shape[cut[0]:cut[1]], shape[cut[1]:]),
            (axes[:cut[0]], axes[cut[0]:cut[1]], axes[cut[1]:]))


def add_lora(model, cfg: LoraConfig, rngs: nnx.Rngs, *, dtype=jnp.float32):
    """In place (and returned): an `Adapter` on every layer's target projections, A kaiming-uniform and
    B zeros (PEFT's default, so the model's outputs do not change), in `dtype`."""
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"add_lora takes a LoraConfig, got {type(cfg).__name__}")
    if has_lora(model):
        raise LoraError("the model already has LoRA adapters (merge_lora them first)")
    for layer, lead in _layer_groups(model):
        for name in cfg.target_modules:
            parent = getattr(layer, TARGETS[name][0])
            (stack, ins, outs), (stack_ax, in_ax, out_ax) = _kernel_split(getattr(parent, name), name, lead)
            bound = 1.0 / math.sqrt(math.prod(ins))  # kaiming_uniform(a=sqrt(5)) over fan-in = prod(ins)
            a = jax.random.uniform(rngs.params(), (*stack, *ins, cfg.rank), dtype, -bound, bound)
            b = jnp.zeros((*stack, cfg.rank, *outs), dtype)
            # eager_sharding=False: as the base weights, logical names are metadata; sharding.py places them.
            a = nnx.LoRAParam(a, out_sharding=(*stack_ax, *in_ax, "lora_rank"), eager_sharding=False)
            b = nnx.LoRAParam(b, out_sharding=(*stack_ax, "lora_rank", *out_ax), eager_sharding=False)
            setattr(parent, f"{name}_lora", Adapter(a, b, cfg.scale, cfg.dropout))
    return model


def mirror_adapters(layer: nnx.Module, stacked_layer: nnx.Module) -> None:
    """Gives a freshly built layer the adapters of the stacked layer, without the "layers" axis (zeros:
    `model.unstack_layers` then copies each layer's slice in, as it does for the base weights)."""
    def one(var, cls):
        axes = var.get_metadata().get("out_sharding")
        return cls(jnp.zeros(var.shape[1:], var.dtype), out_sharding=tuple(axes)[1:], eager_sharding=False)

    for name, (sub, _) in TARGETS.items():
        src = getattr(getattr(stacked_layer, sub), f"{name}_lora", None)
        if src is None:
            continue
        adapter = Adapter(one(src.a, nnx.LoRAParam), one(src.b, nnx.LoRAParam), src.scale, src.dropout)
        if hasattr(src, "dropout_key"):
            adapter.dropout_key = LoRADropoutKey(src.dropout_key[...][0], out_sharding=(), eager_sharding=False)
        setattr(getattr(layer, sub), f"{name}_lora", adapter)


def set_lora_dropout_key(model, key) -> None:
    """Dropout keys for every adapter (one per layer and projection, derived from `key`), or None: no
    dropout (the deterministic forward). Set a key once before jitting a train step, then a new one each
    step inside it (the variables then exist and only their values change)."""
    for k, (index, _, _, adapter) in enumerate(adapters(model)):
        if key is None:
            if hasattr(adapter, "dropout_key"):
                del adapter.dropout_key
            continue
        lead = adapter.a.shape[0] if index is None else None
        sub = jax.random.fold_in(jax.random.fold_in(key, k), 0 if index is None else index)
        value = jax.random.split(sub, lead) if lead is not None else sub
        if hasattr(adapter, "dropout_key"):
            adapter.dropout_key.set_value(value)
        else:
            adapter.dropout_key = LoRADropoutKey(value, out_sharding=("layers",) if lead is not None else (),
                                                 eager_sharding=False)


def _delta(adapter: Adapter, kernel_shape, lead: int) -> jax.Array:
    """scale * A @ B in float32, in the kernel's shape."""
    a, b = adapter.a[...].astype(jnp.float32), adapter.b[...].astype(jnp.float32)
    r = a.shape[-1]
    stack = a.shape[:lead]
    d = jnp.matmul(a.reshape(*stack, -1, r), b.reshape(*stack, r, -1))
    return (adapter.scale * d).reshape(kernel_shape)


def merge_lora(model):
    """In place (and returned): every adapter folded into its kernel (W + scale * A @ B, computed in float32,
    stored in W's dtype) and removed: the plain model, for export and serving. Merge before quantizing."""
    for index, name, parent, adapter in adapters(model):
        kernel = getattr(parent, name)
        w = kernel[...]
        if not isinstance(w, jax.Array):
            raise LoraError(f"cannot merge LoRA into the quantized {name} (merge before quantizing)")
        lead = 1 if index is None else 0
        kernel.set_value((w.astype(jnp.float32) + _delta(adapter, w.shape, lead)).astype(w.dtype))
        delattr(parent, f"{name}_lora")
    return model


# -- PEFT adapter directories ---------------------------------------------------------------------------


def _peft_shapes(model, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """PEFT key -> the [r, in] / [out, r] shape this model needs, for every layer and target."""
    shapes = {}
    layers = _layer_groups(model)
    count = model.config.num_hidden_layers
    for name in cfg.target_modules:
        sub = TARGETS[name][0]
        layer, lead = layers[0]
        (_, ins, outs), _ = _kernel_split(getattr(getattr(layer, sub), name), name, lead)
        for i in range(count):
            shapes[_PEFT_KEY.format(i=i, module=sub, name=name, ab="A")] = (cfg.rank, math.prod(ins))
            shapes[_PEFT_KEY.format(i=i, module=sub, name=name, ab="B")] = (math.prod(outs), cfg.rank)
    return shapes


def _peft_tensors(model):
    """(PEFT key, NumPy array in PEFT's layout) for every adapter of every layer, in layer order."""
    for index, name, _, adapter in adapters(model):
        a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
        per_layer = [(index, a, b)] if index is not None else [(i, a[i], b[i]) for i in range(a.shape[0])]
        sub = TARGETS[name][0]
        for i, a_i, b_i in per_layer:
            r = a_i.shape[-1]
            yield _PEFT_KEY.format(i=i, module=sub, name=name, ab="A"), a_i.reshape(-1, r).T
            yield _PEFT_KEY.format(i=i, module=sub, name=name, ab="B"), b_i.reshape(r, -1).T


def peft_config(cfg: LoraConfig, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json for `cfg` (PEFT fills the fields left out with its defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
            "target_modules": sorted(cfg.target_modules), "use_rslora": cfg.rslora, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
            "revision": None}


def save_peft_adapter(model, cfg: LoraConfig, out_dir: str, base_model_name_or_path: str | None = None) -> None:
    """Writes the model's adapters as a PEFT adapter directory that `peft.PeftModel.from_pretrained` loads
    onto transformers' MistralForCausalLM. The directory appears only once complete."""
    found = {name for _, name, _, _ in adapters(model)}
    if found != set(cfg.target_modules):
        raise LoraError(f"the model's adapters are on {sorted(found)}, the LoraConfig names "
                        f"{sorted(cfg.target_modules)}")
    ranks = {adapter.a.shape[-1] for *_, adapter in adapters(model)}
    if ranks != {cfg.rank}:
        raise LoraError(f"the model's adapters have rank {sorted(ranks)}, the LoraConfig says {cfg.rank}")
    tensors = dict(_peft_tensors(model))
    with storage.atomic_directory(out_dir) as tmp:
        storage.write_json(storage.join(tmp, CONFIG_FILE), peft_config(cfg, base_model_name_or_path))
        specs = {k: (v.shape, v.dtype) for k, v in tensors.items()}
        with SafetensorsWriter(storage.join(tmp, WEIGHTS_FILE), specs) as writer:
            for key, value in tensors.items():
                writer.write(key, np.ascontiguousarray(value))


def read_peft_config(path: str) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory, refusing what this project cannot honour."""
    config_path = storage.join(path, CONFIG_FILE)
    if not storage.isdir(path):
        raise LoraError(f"{path}: not a PEFT adapter directory (no such directory)")
    if not storage.isfile(config_path):
        raise LoraError(f"{path}: not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        raw = storage.read_json(config_path)
    except ValueError as e:
        raise LoraError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise LoraError(f"{config_path}: peft_type is {raw.get('peft_type') if isinstance(raw, dict) else raw!r}, "
                        "only LORA adapters are supported")
    for field in _UNSUPPORTED:
        if raw.get(field):
            raise LoraError(f"{config_path}: {field}={raw[field]!r} is not supported")
    if raw.get("bias", "none") != "none":
        raise LoraError(f"{config_path}: bias={raw['bias']!r} is not supported (only 'none')")
    targets = raw.get("target_modules")
    if targets == "all-linear":
        targets = tuple(TARGETS)
    elif isinstance(targets, str):  # PEFT reads a string as a regular expression over module paths
        raise LoraError(f"{config_path}: target_modules={targets!r} (a pattern) is not supported; list the names")
    try:
        return LoraConfig(rank=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                          target_modules=tuple(targets or ()), rslora=bool(raw.get("use_rslora", False)))
    except LoraError as e:
        raise LoraError(f"{config_path}: {e}") from None


def _check_tensors(files: WeightFiles, expected: dict, weights_path: str) -> None:
    names = set(files.names())
    unexpected, missing = sorted(names - set(expected)), sorted(set(expected) - names)
    if unexpected:
        raise LoraError(f"{weights_path}: unexpected tensor {unexpected[0]} (not a LoRA weight of this model's "
                        f"target modules and layers)")
    if missing:
        raise LoraError(f"{weights_path}: missing tensor {missing[0]}")
    for key, shape in expected.items():
        if files.shape(key) != shape:
            raise LoraError(f"{weights_path}: tensor {key} has shape {files.shape(key)}, this model needs {shape} "
                            "(an adapter for another base model?)")


def _open_checked(model, path: str) -> tuple[LoraConfig, WeightFiles, str]:
    """(config, open weight files, weights path) of a PEFT adapter directory checked against `model` (an
    abstract model is enough: only shapes are read)."""
    cfg = read_peft_config(path)
    weights_path = storage.join(path, WEIGHTS_FILE)
    if not storage.isfile(weights_path):
        if storage.isfile(storage.join(path, "adapter_model.bin")):
            raise LoraError(f"{path}: adapter_model.bin is a pickle and is not loaded; save it as safetensors")
        raise LoraError(f"{path}: not a PEFT adapter directory (no {WEIGHTS_FILE})")
    if has_lora(model):
        raise LoraError("the model already has LoRA adapters (merge_lora them first)")
    try:
        files = WeightFiles(read_safetensors_header(weights_path), {})
    except ValueError as e:
        raise LoraError(str(e)) from None
    try:
        _check_tensors(files, _peft_shapes(model, cfg), weights_path)
    except LoraError:
        files.close()
        raise
    return cfg, files, weights_path


def check_peft_adapter(model, path: str) -> LoraConfig:
    """What `load_peft_adapter` checks (config, tensor names and shapes against `model`, which may be
    abstract), without loading anything: for validating inputs before any work."""
    cfg, files, _ = _open_checked(model, path)
    files.close()
    return cfg


def load_peft_adapter(model, path: str, *, dtype=jnp.float32) -> LoraConfig:
    """Attaches the adapters of a PEFT adapter directory (safetensors only; pickles are never read) to the
    model, in place, and returns their LoraConfig. Everything is checked before the model changes."""
    cfg, files, _ = _open_checked(model, path)
    add_lora(model, cfg, nnx.Rngs(0), dtype=dtype)
    for index, name, _, adapter in adapters(model):
        sub = TARGETS[name][0]
        layer_ids = range(model.config.num_hidden_layers) if index is None else [index]
        for ab, var in (("A", adapter.a), ("B", adapter.b)):
            per_layer_shape = var.shape[1:] if index is None else var.shape
            # [r, in] -> [*in, r] and [out, r] -> [r, *out]: transpose, then split the flattened axes.
            parts = [files.get(_PEFT_KEY.format(i=i, module=sub, name=name, ab=ab)).T.reshape(per_layer_shape)
                     for i in layer_ids]
            value = np.stack(parts) if index is None else parts[0]
            var.set_value(jnp.asarray(value, dtype))
    files.close()
    return cfg



class PeftDeltas:
    """The merge updates of a PEFT adapter directory, read tensor by tensor: `delta(state path, layer, box)`
    is scale * A @ B for that layer's projection in the kernel's JAX layout [*in, *out] (float32, only the
    box [(start, stop) per dim] of it when given), or None for a tensor the adapter does not touch. Checked
    against `model` (an abstract model will do) on construction; `close()` when done."""

    def __init__(self, model, path: str):
        self.cfg, self.files, _ = _open_checked(model, path)
        layer, lead = _layer_groups(model)[0]
        self.shapes = {}
        for name in self.cfg.target_modules:
            (_, ins, outs), _ = _kernel_split(getattr(getattr(layer, TARGETS[name][0]), name), name, lead)
            self.shapes[name] = (tuple(ins), tuple(outs))

    def __call__(self, state_path, layer, box=None) -> np.ndarray | None:
        state_path = tuple(state_path)
        if len(state_path) != 3 or state_path[0] != "layers" or state_path[2] not in self.shapes or layer is None:
            return None
        name = state_path[2]
        sub, (ins, outs) = TARGETS[name][0], self.shapes[name]
        a = self.files.get(_PEFT_KEY.format(i=layer, module=sub, name=name, ab="A")).T  # [r, in] -> [in, r]
        b = self.files.get(_PEFT_KEY.format(i=layer, module=sub, name=name, ab="B")).T  # [out, r] -> [r, out]
        a = np.asarray(a, np.float32).reshape(*ins, -1)
        b = np.asarray(b, np.float32).reshape(-1, *outs)
        if box is not None:  # only the rows of A and the columns of B the box needs
            cut = [slice(lo, hi) for lo, hi in box]
            a, b = a[tuple(cut[:len(ins)])], b[(slice(None), *cut[len(ins):])]
        return np.float32(self.cfg.scale) * np.tensordot(a, b, axes=1)

    def close(self) -> None:
        self.files.close()


def error_line(e: LoraError, prefix: str, arg: str) -> str:
    """`--lora DIR: reason` (prefix "--lora ", or "lora=" from Python), naming the user's argument once."""
    message = str(e)
    return prefix + (message if message.startswith(str(arg)) else f"{arg}: {message}")
