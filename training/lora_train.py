"""LoRA and QLoRA training: the adapters are the train state's params, the frozen base rides beside them.

Inside: `abstract_lora_model(run)`, `split(model)` (graphdef, trainable state, frozen state or None),
`variable_shardings(state, mesh)`, `abstract_frozen(run, mesh)`, `load_base(run, mesh, frozen_shardings,
with_adapters)` (the frozen base placed on the mesh, plus the starting adapters), `check_lora(run)` (every
input checked before any work), `check_resume(meta, run, where)`, and `export_lora(workdir, out)`
(`normistral export-lora`: the latest checkpoint's adapters as a PEFT adapter directory).

Design choices:
- The train state (training/step.py) keeps its shape: `params` holds only the adapters (`jaxmodel.lora.
  TRAINABLE`, i.e. `nnx.LoRAParam`), so gradients, the optimizer (optax over `params` only: the base has no
  moments) and checkpoints (training/checkpoint.py saves `params`, `opt_state` and progress) see only them.
  The frozen base is `state["frozen"]`: an input of the jitted step that comes back unchanged (donated and
  aliased, so no copy), never saved; a resumed run loads it again from `model.init_from` (or rebuilds the
  same random base from `train.seed`) and restores the adapters from the checkpoint.
- QLoRA (`lora.base_quantize: int8|int4`): the base is quantized while it streams from the files, as
  inference loads it (`jaxmodel.quant.load_transform`); the model reads a `QArray` through `.astype`, so
  the gradient reaches the activations through the dequantized matmul and the integers never change.
- Dropout: a fresh key per step and microbatch, derived from the step's key (training/step.py), so a
  resumed run draws the same masks.
- export-lora reads what the checkpoint itself saved (the `meta` item's lora section and init_from, the model
  config item) and only its `params` item (the adapters) onto the host's CPU, into an abstract model whose
  base stays ShapeDtypeStructs: no base weights are read, and no run config is needed.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxmodel import lora as lora_lib
from jaxmodel import quant, storage
from jaxmodel.config import ConfigError
from jaxmodel.model import MistralForCausalLM, abstract_model
from jaxmodel.sharding import model_shardings, param_sharding
from training.checkpoint import latest_finalized_step
from training.config import RunConfig

# Folded into a microbatch's key for its adapters' dropout (the masked objective uses the key itself).
DROPOUT_STREAM = 0x10a


def abstract_lora_model(run: RunConfig) -> MistralForCausalLM:
    """The model with its adapters, ShapeDtypeStruct leaves only."""
    cfg = run.lora.lora_config()
    return nnx.eval_shape(lambda: lora_lib.add_lora(MistralForCausalLM(run.model, rngs=nnx.Rngs(0)), cfg,
                                                    nnx.Rngs(0)))


def split(model):
    """(graphdef, the trained parameters' state, the frozen base's state or None without adapters)."""
    if not lora_lib.has_lora(model):
        graphdef, state = nnx.split(model)
        return graphdef, state, None
    return nnx.split(model, lora_lib.TRAINABLE, lora_lib.FROZEN)


def variable_shardings(state: nnx.State, mesh) -> dict:
    """Pure dict of NamedShardings for a state's variables (by their logical axes)."""
    shardings = jax.tree.map(lambda v: param_sharding(v, mesh), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def abstract_frozen(run: RunConfig, mesh) -> dict:
    """The frozen base as a pure dict of ShapeDtypeStructs carrying their shardings (QArrays of them when
    quantized): what the jitted step receives."""
    _, _, frozen = split(abstract_lora_model(run))
    mode = run.lora.base_quantize
    if mode is not None:
        return nnx.to_pure_dict(quant.abstract_quantized_state(frozen, mesh, mode))
    shardings = variable_shardings(frozen, mesh)
    shapes = nnx.to_pure_dict(frozen)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _base_model(run: RunConfig, mesh) -> MistralForCausalLM:
    """The base model on the mesh, quantized when asked: from `model.init_from`, or (no init_from: tests and
    the tiny config) the random init of `train.seed`, the same one on every resume."""
    mode = run.lora.base_quantize
    if run.init_from is not None:
        from jaxmodel.convert import PARAMS_DIR, from_pretrained
        from jaxmodel.hub import resolve_model

        path = resolve_model(run.init_from)
        streaming = mode is not None and not storage.isdir(storage.join(path, PARAMS_DIR))
        model = from_pretrained(path, dtype=run.model.weight_dtype, compute_dtype=run.model.compute_dtype,
                                mesh=mesh, attention_impl=run.model.attention_impl, remat=run.model.remat,
                                scan_layers=run.model.scan_layers, progress=jax.process_index() == 0,
                                transform=quant.load_transform(mode) if streaming else None)
        if mode is not None and not streaming:  # an import-hf (Orbax) directory: quantized layer by layer
            quant.quantize_model(model, mode)
        return model
    shapes = abstract_model(run.model)
    graphdef = nnx.graphdef(shapes)
    shardings = nnx.to_pure_dict(model_shardings(shapes, mesh))
    seed = run.train.seed
    with jax.set_mesh(mesh):
        params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(MistralForCausalLM(run.model, rngs=nnx.Rngs(seed)))),
                         out_shardings=shardings)()
    model = nnx.merge(graphdef, params)
    return quant.quantize_model(model, mode) if mode is not None else model


def load_base(run: RunConfig, mesh, frozen_shardings: dict, *, with_adapters: bool = True):
    """(frozen base, starting adapters or None) as pure dicts placed on the mesh. The adapters are
    `lora.init_from_adapter`'s, or fresh ones (A uniform from `train.seed`, B zeros: PEFT's init)."""
    model = _base_model(run, mesh)
    cfg = run.lora.lora_config()
    if run.lora.init_from_adapter is not None and with_adapters:
        lora_lib.load_peft_adapter(model, run.lora.init_from_adapter)
    else:
        lora_lib.add_lora(model, cfg, nnx.Rngs(run.train.seed))
    _, adapters, frozen = split(model)
    frozen = jax.device_put(nnx.to_pure_dict(frozen), frozen_shardings)
    if not with_adapters:
        return frozen, None
    adapters = jax.device_put(nnx.to_pure_dict(adapters), variable_shardings(_trainable(model), mesh))
    return frozen, adapters


def _trainable(model):
    return nnx.state(model, lora_lib.TRAINABLE)


def check_lora(run: RunConfig) -> None:
    """The `lora:` inputs that need files, checked before data, weights or compiling: the starting adapter
    is a PEFT LoRA directory, made for this architecture (tensor names and shapes), with this section's
    rank, alpha, rslora and target modules; a merged export is not asked of a quantized base."""
    if run.lora is None:
        return
    if run.lora.base_quantize is not None and run.train.export_hf:
        raise ConfigError(f"{run.where('train.export_hf')}: train.export_hf writes the adapters merged into the "
                          f"base, which cannot be done over a {run.lora.base_quantize} base (lora.base_quantize); "
                          "drop one of the two")
    if run.lora.init_from_adapter is None:
        return
    where = run.where("lora.init_from_adapter")
    path = run.lora.init_from_adapter
    try:
        found = lora_lib.read_peft_config(path)
        lora_lib.check_peft_adapter(abstract_model(run.model), path)
    except lora_lib.LoraError as e:
        raise ConfigError(f"{where}: lora.init_from_adapter {e}") from None
    ours = run.lora.lora_config()
    diff = [f"{k}: {getattr(found, k)!r} != {getattr(ours, k)!r}" for k in ("rank", "alpha", "rslora")
            if getattr(found, k) != getattr(ours, k)]
    if sorted(found.target_modules) != sorted(ours.target_modules):
        diff.append(f"target_modules: {sorted(found.target_modules)} != {sorted(ours.target_modules)}")
    if diff:
        raise ConfigError(f"{where}: lora.init_from_adapter {path} does not match the lora section "
                          f"({'; '.join(diff)})")


# The settings a checkpoint's adapters depend on: a resume with others is refused.
_RESUME_FIELDS = ("rank", "alpha", "target_modules", "rslora", "base_quantize")


def check_resume(meta: dict, run: RunConfig, where: str) -> None:
    """Refuses to resume full fine-tuning checkpoints as LoRA ones or the reverse, or adapters of another
    shape or base, with one line (Orbax would fail on the shapes, or silently load another base)."""
    saved = meta.get("lora")
    if (saved is None) != (run.lora is None):
        kinds = ("LoRA adapters", "full fine-tuning") if saved is not None else ("full fine-tuning", "LoRA")
        raise ConfigError(f"{where}: the checkpoints there are {kinds[0]}, this run is {kinds[1]}; "
                          "use another --workdir")
    if saved is None:
        return
    ours = {k: getattr(run.lora, k) for k in _RESUME_FIELDS}
    diff = [f"lora.{k}: {saved.get(k)!r} != {ours[k]!r}" for k in _RESUME_FIELDS
            if (list(saved.get(k) or []) if k == "target_modules" else saved.get(k))
            != (list(ours[k]) if k == "target_modules" else ours[k])]
    if diff:
        raise ConfigError(f"{where}: the checkpoints there are of other adapters ({'; '.join(diff)}); "
                          "use another --workdir")


def dropout_key(key):
    """A microbatch's adapter-dropout key from its step key."""
    return jax.random.fold_in(key, DROPOUT_STREAM)


def merged_model(graphdef, params: dict, frozen: dict | None):
    """The model of a train state: the parameters, or the adapters over the frozen base."""
    if frozen is None:
        return nnx.merge(graphdef, params)
    return nnx.merge(graphdef, params, frozen)


# -- export-lora: a run's latest adapters as a PEFT adapter directory ---------------------------------------


def _checkpoint_step(workdir: str) -> str:
    """The latest checkpoint step directory of a run: WORKDIR/checkpoints/<step>, or WORKDIR/<step> when
    WORKDIR is the checkpoint directory itself (a run with another `checkpoint.dir`)."""
    resolved = storage.resolve(workdir)
    if not storage.isdir(resolved):
        storage.check_bucket(resolved)
        what = "is a file" if storage.exists(resolved) else "does not exist"
        raise ConfigError(f"{workdir}: the workdir {what}; expected a LoRA training run's --workdir")
    for directory in (storage.join(resolved, "checkpoints"), resolved):
        step = latest_finalized_step(directory)
        if step is not None:
            return storage.join(directory, str(step))
    raise ConfigError(f"{workdir}: no checkpoint there (neither {storage.join(resolved, 'checkpoints')}/<step> "
                      "nor <step> directories); train the run first")


def _read_meta(step_dir: str) -> dict:
    """The run's settings saved with a checkpoint (training/checkpoint.py's `meta` item)."""
    import orbax.checkpoint as ocp
    from etils import epath

    try:
        return dict(ocp.JsonCheckpointHandler().restore(epath.Path(storage.join(step_dir, "meta"))))
    except Exception as e:  # noqa: BLE001 (Orbax raises several kinds for a missing or unreadable item)
        raise ConfigError(f"{step_dir}: cannot read the run's settings saved with this checkpoint "
                          f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})") from None


def _restored_lora_model(step_dir: str, cfg: lora_lib.LoraConfig):
    """An abstract model (ShapeDtypeStruct base) carrying the checkpoint's adapters as host arrays: all
    `save_peft_adapter` reads. Only the adapters are read, so an 11B run's export needs no base weights."""
    import orbax.checkpoint as ocp

    from jaxmodel.config import MistralConfig
    from jaxmodel.convert import config_source

    model_config = MistralConfig.from_hf(config_source(step_dir))
    model = nnx.eval_shape(lambda: lora_lib.add_lora(MistralForCausalLM(model_config, rngs=nnx.Rngs(0)), cfg,
                                                     nnx.Rngs(0)))
    graphdef, adapters, frozen = split(model)
    device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          nnx.to_pure_dict(adapters))
    try:
        restored = ocp.StandardCheckpointer().restore(storage.join(step_dir, "params"), target)
    except Exception as e:  # noqa: BLE001 (TensorStore raises bare Exceptions for truncated chunks)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" See full TensorStore details")[0]
        raise ConfigError(f"{step_dir}: cannot read the adapters of this checkpoint ({first[:200]})") from None
    nnx.replace_by_pure_dict(adapters, restored)
    return nnx.merge(graphdef, adapters, frozen)


def export_lora(workdir: str, out: str) -> str:
    """`normistral export-lora WORKDIR OUT`: the adapters of a LoRA run's latest checkpoint written as a PEFT
    adapter directory (adapter_config.json + adapter_model.safetensors) that `peft.PeftModel.from_pretrained`
    loads onto transformers' MistralForCausalLM. The run's `lora:` settings, model config and base
    (`model.init_from`, recorded as base_model_name_or_path) come from what the checkpoint saved. Local or
    gs:// paths; OUT appears only once complete. Returns a one-line summary; a bad input raises ConfigError
    (one line) before anything is read or written."""
    step_dir = _checkpoint_step(workdir)
    meta = _read_meta(step_dir)
    section = meta.get("lora")
    if section is None:
        raise ConfigError(f"{workdir}: the checkpoints there are of a full fine-tuning run, not LoRA adapters "
                          f"(export its weights with normistral export-hf {step_dir} OUT)")
    try:
        storage.check_output_dir(out)
    except storage.StorageError as e:
        raise ConfigError(str(e)) from None
    cfg = lora_lib.LoraConfig(rank=section["rank"], alpha=section["alpha"], dropout=section.get("dropout", 0.0),
                              target_modules=tuple(section["target_modules"]), rslora=bool(section.get("rslora")))
    model = _restored_lora_model(step_dir, cfg)
    lora_lib.save_peft_adapter(model, cfg, out, base_model_name_or_path=meta.get("init_from"))
    return (f"export-lora: wrote {storage.resolve(out)} (PEFT LoRA adapter: rank {cfg.rank}, alpha {cfg.alpha:g}, "
            f"{', '.join(cfg.target_modules)}; step {storage.basename(step_dir)} of {storage.resolve(workdir)})")
