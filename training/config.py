"""The training sections of a run config, each a small frozen dataclass, and `RunConfig` holding them all.

Inside: `TrainConfig` (`train:`), `DataConfig` (`data:`), `CheckpointConfig` (`checkpoint:`),
`OptimizerConfig` (`optimizer:`), `LoraSection` (`lora:`, optional: LoRA/QLoRA instead of full
fine-tuning), `RunConfig` and `load(tree)`, which also reads the `model:` and `mesh:`
sections through `jaxmodel.run_config` (the same YAML file serves `normistral train` and
`normistral compile-check`).

Design choices:
- `model.init_from` (a Hugging Face or `import-hf` directory) is the one model key that
  `jaxmodel.run_config.model_config` does not know; it is taken out here before that parser runs. When the
  model section names no `preset`/`hf_config`, the architecture is read from `init_from`'s config.json;
  when it names one (the big recipes do, so that `compile-check` works without the weights on disk), the
  trainer checks the two agree before loading.
- Relative paths: `model.init_from` is relative to the YAML file (like `hf_config`); data, checkpoint and
  export paths are relative to the run's `--workdir`. A relative `init_from` shaped `org/name[@revision]`
  with no directory of that name beside the YAML is a Hugging Face model id (`jaxmodel.hub`): kept as the
  id, fetched when the trainer loads it (so `compile-check`, which never opens the weights, downloads
  nothing), and only its config.json fetched here when the architecture must come from it.
- `lora.init_from_adapter` is relative to the YAML file, as `model.init_from`.
- Every value is validated when the section is read; an unknown key is an error naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from jaxmodel import hub
from jaxmodel.config import ConfigError, MistralConfig
from jaxmodel.lora import TARGETS, LoraConfig, LoraError
from jaxmodel.run_config import from_section, mesh_shape, model_config, section, where
from jaxmodel.sharding import MeshShape

SCHEDULES = ("constant", "cosine", "wsd")
NONFINITE = ("skip", "abort")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _positive_int(value, name: str, *, zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if zero else value > 0)
    _check(ok, f"{name} must be a {'non-negative' if zero else 'positive'} integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`train:` the loop. Batch sizes are global (all processes) and counted in sequences."""

    steps: int = 300  # optimizer updates in the whole run (a resumed run continues to this number)
    global_batch_size: int = 8
    seq_len: int = 128
    microbatches: int = 1  # gradient accumulation: the global batch is split into this many parts
    seed: int = 0  # parameter init (random-init runs) and the per-step RNG (masking)
    loss_chunk: int = 2048  # tokens of the sequence per cross-entropy chunk (see training/loss.py)
    mntp_probability: float = 0.0  # NorMistral's hybrid objective: P(a step is masked next-token prediction)
    mask_token_id: int = 4
    num_special_tokens: int = 16  # ids below this are never masked
    nonfinite: str = "skip"  # a non-finite loss or gradient: skip the update, or abort the run
    eval_every: int = 0  # steps between held-out evaluations (0: never)
    eval_batches: int = 4  # batches of global_batch_size sequences per evaluation
    # lm-evaluation-harness tasks (NorEval's norec_sentence, ...) run every eval_every steps; scores go to
    # metrics.jsonl as "eval/<task>/<metric>" and to TensorBoard. The run needs an evaluation hook, which
    # `normistral train` builds (inference/lm_eval_adapter.py; training/ never imports inference/).
    eval_tasks: tuple[str, ...] | None = None
    eval_num_fewshot: int | None = None  # default: each task's own
    eval_limit: int | None = None  # at most this many documents per task
    eval_include_path: str | None = None  # a directory of extra task YAMLs (relative to the config file)
    peak_flops_per_device: float | None = None  # for MFU; default by device kind (training/metrics.py)
    export_hf: str | None = None  # a Hugging Face directory written at the end of the run
    export_dtype: str | None = None  # its tensor dtype (default: the model's torch_dtype)

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "seq_len", "microbatches", "loss_chunk", "eval_batches"):
            _positive_int(getattr(self, name), f"train.{name}")
        _positive_int(self.eval_every, "train.eval_every", zero=True)
        if isinstance(self.eval_tasks, str):  # --set train.eval_tasks=a,b
            object.__setattr__(self, "eval_tasks", tuple(t.strip() for t in self.eval_tasks.split(",") if t.strip()))
        if self.eval_tasks is not None:
            _check(isinstance(self.eval_tasks, (list, tuple)) and self.eval_tasks
                   and all(isinstance(t, str) and t for t in self.eval_tasks),
                   f"train.eval_tasks must be a list of task names, got {self.eval_tasks!r}")
            object.__setattr__(self, "eval_tasks", tuple(self.eval_tasks))
            _check(self.eval_every > 0, "train.eval_tasks needs train.eval_every > 0 (steps between evaluations)")
        if self.eval_num_fewshot is not None:
            _positive_int(self.eval_num_fewshot, "train.eval_num_fewshot", zero=True)
        if self.eval_limit is not None:
            _positive_int(self.eval_limit, "train.eval_limit")
        _check(self.eval_include_path is None or isinstance(self.eval_include_path, str),
               "train.eval_include_path must be a directory path")
        _check(self.global_batch_size % self.microbatches == 0,
               f"train.global_batch_size={self.global_batch_size} is not a multiple of "
               f"train.microbatches={self.microbatches}")
        _check(isinstance(self.mntp_probability, (int, float)) and 0.0 <= self.mntp_probability <= 1.0,
               f"train.mntp_probability must lie in [0, 1], got {self.mntp_probability!r}")
        _check(self.nonfinite in NONFINITE, f"train.nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        _positive_int(self.mask_token_id, "train.mask_token_id", zero=True)
        _positive_int(self.num_special_tokens, "train.num_special_tokens", zero=True)
        _check(self.peak_flops_per_device is None or self.peak_flops_per_device > 0,
               f"train.peak_flops_per_device must be positive or null, got {self.peak_flops_per_device!r}")
        _check(self.export_hf is None or bool(self.export_hf), "train.export_hf must be a path or null")
        _check(self.export_dtype in (None, "float32", "bfloat16", "float16"),
               f"train.export_dtype must be float32, bfloat16 or float16, got {self.export_dtype!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`data:` where the packed token sequences come from (training/data.py's PackedDataset dirs).

    `corpus: bundled` builds `dir` (and `eval_dir`) from the repository's own corpus (training/corpus)
    when they do not exist yet: a tokenizer is trained into `tokenizer_dir`, then the documents are
    tokenized and packed. A path or glob of .jsonl/.txt files does the same from those files."""

    dir: str = "data"
    eval_dir: str | None = None
    corpus: str | None = None  # "bundled", or a glob of .jsonl/.txt files
    heldout: str | None = None  # the documents for eval_dir (bundled: training/corpus/heldout.jsonl)
    tokenizer_dir: str = "tokenizer"  # an existing tokenizer is reused; else one is trained (with corpus)
    seed: int = 0  # the data order (PackedDataset.batch's seed)

    def __post_init__(self):
        _check(isinstance(self.dir, str) and self.dir, "data.dir must be a path")
        _check(isinstance(self.tokenizer_dir, str) and self.tokenizer_dir, "data.tokenizer_dir must be a path")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """`checkpoint:` Orbax CheckpointManager policy. The last `keep` checkpoints are kept, plus every
    checkpoint whose step is a multiple of `keep_period` (forever)."""

    dir: str = "checkpoints"
    every: int = 100  # steps between saves (the final step and a preemption always save)
    keep: int = 3
    keep_period: int | None = None
    async_save: bool = True

    def __post_init__(self):
        _positive_int(self.every, "checkpoint.every")
        _positive_int(self.keep, "checkpoint.keep")
        if self.keep_period is not None:
            _positive_int(self.keep_period, "checkpoint.keep_period")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """`optimizer:` AdamW with decoupled weight decay, global-norm clipping and a learning-rate schedule.

    schedule: `constant` (linear warmup, then flat), `cosine` (warmup, cosine to end_lr_ratio * lr at
    the last step), `wsd` (warmup, flat, then a linear decay over the last `decay_steps` steps)."""

    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_steps: int | None = None  # wsd: the length of the final decay (default: 10% of train.steps)
    end_lr_ratio: float = 0.1  # cosine and wsd end at learning_rate * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = True  # decay embed_tokens / lm_head too (NorMistral: every matrix)
    clip_norm: float | None = 1.0  # global gradient norm (None: no clipping)

    def __post_init__(self):
        _check(self.schedule in SCHEDULES, f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(isinstance(self.learning_rate, (int, float)) and self.learning_rate >= 0,
               f"optimizer.learning_rate must be a non-negative number, got {self.learning_rate!r}")
        _positive_int(self.warmup_steps, "optimizer.warmup_steps", zero=True)
        if self.decay_steps is not None:
            _positive_int(self.decay_steps, "optimizer.decay_steps")
        _check(self.clip_norm is None or self.clip_norm > 0,
               f"optimizer.clip_norm must be positive or null, got {self.clip_norm!r}")
        _check(0 <= self.end_lr_ratio <= 1, f"optimizer.end_lr_ratio must lie in [0, 1], got {self.end_lr_ratio!r}")
        for name in ("b1", "b2"):
            _check(0 <= getattr(self, name) < 1, f"optimizer.{name} must lie in [0, 1), got {getattr(self, name)!r}")
        _check(self.eps > 0, f"optimizer.eps must be positive, got {self.eps!r}")
        _check(self.weight_decay >= 0, f"optimizer.weight_decay must be non-negative, got {self.weight_decay!r}")


BASE_QUANTIZE = (None, "int8", "int4")  # jaxmodel.quant.MODES, or a full-precision frozen base


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """`lora:` train rank-`rank` adapters on `target_modules` (PEFT's names) over a frozen base, which is
    kept in the model's param_dtype or quantized at load (`base_quantize`: QLoRA). `init_from_adapter`: a
    PEFT adapter directory to start from (its rank, alpha, rslora and target modules must equal these)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = tuple(TARGETS)
    rslora: bool = False
    base_quantize: str | None = None
    init_from_adapter: str | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # --set lora.target_modules=q_proj,v_proj
            names = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
            object.__setattr__(self, "target_modules", names)
        _check(isinstance(self.target_modules, (list, tuple)), "lora.target_modules must be a list of names, got "
               f"{self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        try:
            self.lora_config()
        except LoraError as e:  # "LoRA rank must be ..." -> "lora.rank must be ..."
            message = str(e)
            for key in ("rank", "alpha", "dropout", "target_modules"):
                message = message.replace(f"LoRA {key}", f"lora.{key}")
            if not message.startswith("lora."):  # "unknown LoRA target module 'x_proj' (known: ...)"
                message = f"lora.target_modules: {message}"
            raise ValueError(message) from None
        _check(self.base_quantize in BASE_QUANTIZE,
               f"lora.base_quantize must be null, int8 or int4, got {self.base_quantize!r}")
        _check(self.init_from_adapter is None or (isinstance(self.init_from_adapter, str) and self.init_from_adapter),
               f"lora.init_from_adapter must be a PEFT adapter directory, got {self.init_from_adapter!r}")

    def lora_config(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=self.target_modules, rslora=self.rslora)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: MistralConfig
    init_from: str | None
    mesh: MeshShape
    train: TrainConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    optimizer: OptimizerConfig
    path: str  # the YAML file
    origins: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # key -> FILE:LINE / --set
    lora: LoraSection | None = None  # None: full fine-tuning

    def where(self, key: str) -> str:
        """The culprit to name in an error about `key` (run_config.where)."""
        return where({"_origins": self.origins, "_shown": self.path}, key)

    def snapshot(self) -> dict:
        """A JSON-able record of the run's settings (saved with each checkpoint)."""
        return {"model": self.model.to_hf() | {k: getattr(self.model, k) for k in
                                               ("dtype", "param_dtype", "attention_impl", "remat")},
                "init_from": self.init_from, "mesh": dataclasses.asdict(self.mesh),
                **{name: dataclasses.asdict(getattr(self, name))
                   for name in ("train", "data", "checkpoint", "optimizer")},
                "lora": dataclasses.asdict(self.lora) if self.lora is not None else None}


def load(tree: dict) -> RunConfig:
    """All sections of a loaded run config (`jaxmodel.run_config.load_run_config`)."""
    path = tree.get("_path", "config")
    tree = copy.deepcopy(tree)
    model = section(tree, "model")
    init_from = model.pop("init_from", None)
    if init_from is not None:
        if not isinstance(init_from, str) or not init_from:
            raise ConfigError(f"{where(tree, 'model.init_from')}: model.init_from must be a directory path, "
                              f"got {init_from!r}")
        hub_id = False
        if not os.path.isabs(init_from) and "://" not in init_from:  # a gs:// URL is taken as it is
            beside = os.path.join(os.path.dirname(path), init_from)
            hub_id = not os.path.isdir(beside) and hub.is_hub_id(init_from)
            init_from = init_from if hub_id else beside
        if "preset" not in model and "hf_config" not in model:
            model["hf_config"] = hub.resolve_model(init_from, config_only=True) if hub_id else init_from
    tree["model"] = model
    lora = _lora_section(tree, path)
    return RunConfig(model=model_config(tree), init_from=init_from, mesh=mesh_shape(tree),
                     train=from_section(TrainConfig, tree, "train"), data=from_section(DataConfig, tree, "data"),
                     checkpoint=from_section(CheckpointConfig, tree, "checkpoint"),
                     optimizer=from_section(OptimizerConfig, tree, "optimizer"), path=path,
                     origins=dict(tree.get("_origins", {})), lora=lora)


def _lora_section(tree: dict, path: str) -> LoraSection | None:
    """The `lora:` section (None when absent), its adapter directory made relative to the YAML file."""
    if tree.get("lora") is None:
        return None
    lora = from_section(LoraSection, tree, "lora")
    adapter = lora.init_from_adapter
    if adapter is not None and not os.path.isabs(adapter) and "://" not in adapter:
        lora = dataclasses.replace(lora, init_from_adapter=os.path.join(os.path.dirname(path), adapter))
    return lora
