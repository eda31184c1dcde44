"""`InferenceConfig`: the YAML `inference:` section, the one set of inference settings that `serve --config`,
`generate --config` and `compile-check` read; command-line flags given explicitly override it.

Inside: `InferenceConfig`, `inference_config(tree)`, `from_args(args, flags, tree)` (the section merged with
the flags that were given), `culprit(...)` (the flag or FILE:LINE a value came from, for error lines), and
what generate and serve share: `add_config_flag`, `read_config(args, flags)`, `config_mesh(tree)`.

Field names are the engine's (inference/engine/): `max_num_seqs`, `max_model_len`, `prefill_chunk`,
`kv_cache_dtype`, `quantize`, `group_size`, `max_queue`, `kv_cache_memory`, `page_size`, `prefix_caching`,
plus `max_new_tokens` (generate). `batch_size` x `max_length` is the static generation program that
`compile-check --mode prefill/decode` compiles (and the default of `max_num_seqs`: `seqs`); `memory_gib`
and `average_len` are compile-check's report settings. The section is read, and every value checked, before
any model load or compile. No JAX import at module level: the parser imports this module.
"""

from __future__ import annotations

import dataclasses

from jaxmodel.cli import DEFAULT_GROUP_SIZE, QUANTIZE_CHOICES, CommandError

QUANTIZE_MODES = QUANTIZE_CHOICES  # inference.quantize.MODES (a test checks they agree)
KV_CACHE_DTYPES = (None, "int8")  # jaxmodel.kv_cache.KV_DTYPES
_POSITIVE = ("max_model_len", "prefill_chunk", "group_size", "max_queue", "page_size", "max_new_tokens", "batch_size",
             "max_length", "average_len", "max_num_seqs")
_OPTIONAL = ("max_num_seqs", "max_model_len")
# The lowest values serve and generate accept (prompt chunks below one page only multiply steps).
LOWEST = (("max_model_len", 2), ("max_queue", 1), ("prefill_chunk", 16))


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    # The engine (normistral serve, generate, Generator); the defaults are serve's and generate's.
    max_num_seqs: int | None = None  # sequences decoded together at most (default: batch_size)
    max_model_len: int | None = None  # the longest sequence, prompt + completion (default: the model's context)
    prefill_chunk: int = 256  # prompt tokens per step and row, at most
    kv_cache_dtype: str | None = None  # None (the compute dtype) or "int8"
    quantize: str | None = None  # weights: None, "int8" or "int4"
    group_size: int = DEFAULT_GROUP_SIZE  # int4: inputs per scale
    max_queue: int = 256  # serve: waiting requests beyond which it answers 429
    kv_cache_memory: int | float | str | None = None  # the pool: bytes ("3GiB", 123456) or a fraction of free memory
    page_size: int = 16  # tokens per KV cache page
    prefix_caching: bool = True  # reuse the cached pages of earlier prompts' common prefixes
    max_new_tokens: int = 64  # generate, and the static program's new tokens
    # compile-check: the static generation program's rows and cache slots, and how its verdict is judged.
    batch_size: int = 8
    max_length: int = 4096
    memory_gib: float | None = None  # judge `fits` against this much memory (GiB) instead of the chip's HBM
    average_len: int = 1024  # the sequence length `max_concurrent_seqs` is stated at

    def __post_init__(self):
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize={self.quantize!r} is not one of {QUANTIZE_MODES} (or null)")
        if self.memory_gib is not None and not (isinstance(self.memory_gib, (int, float)) and self.memory_gib > 0):
            raise ValueError(f"memory_gib must be a positive number, got {self.memory_gib!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"prefix_caching must be true or false, got {self.prefix_caching!r}")
        if self.kv_cache_memory is not None:
            from jaxmodel.checks import memory_amount

            try:
                object.__setattr__(self, "kv_cache_memory", memory_amount(self.kv_cache_memory))
            except ValueError as e:
                raise ValueError(f"kv_cache_memory: {e}") from None

    @property
    def seqs(self) -> int:
        """The engine's sequence count: max_num_seqs, else batch_size."""
        return self.max_num_seqs or self.batch_size


def inference_config(tree: dict) -> InferenceConfig:
    """The `inference:` section of a loaded run config (an empty or missing one: the defaults)."""
    from jaxmodel import run_config

    return run_config.from_section(InferenceConfig, tree, "inference")


def from_args(args, flags: dict[str, str], tree: dict | None) -> InferenceConfig:
    """The section of `tree` (None: no --config, the defaults) with every flag that was given (not None)
    replacing its field. `flags` maps a field to the flag that sets it, e.g. {"max_num_seqs": "--batch-size"}
    for generate (the flag's argparse dest: `_dest`). argparse defaults of None tell what was given."""
    base = inference_config(tree) if tree is not None else InferenceConfig()
    given = {field: getattr(args, _dest(field, flag)) for field, flag in flags.items()
             if getattr(args, _dest(field, flag)) is not None}
    try:
        return dataclasses.replace(base, **given)
    except ValueError as e:  # a flag's value the checks refuse (argparse checked its type): name the flag
        from jaxmodel.config import ConfigError

        field = next((f for f in given if str(e).startswith(f)), None)
        if field is None:
            raise
        raise ConfigError(f"{flags[field]} {given[field]}: must {str(e).split(' must ', 1)[-1]}") from None


def _dest(field: str, flag: str) -> str:
    """The argparse dest of `flag` (--batch-size -> batch_size; --no-prefix-caching's is prefix_caching)."""
    return field if flag.startswith("--no-") else flag.removeprefix("--").replace("-", "_")


def culprit(args, field: str, flag: str, tree: dict | None) -> str:
    """Where a merged value came from, for an error line: `--flag VALUE` if given, else `FILE:LINE:
    inference.FIELD=VALUE` from --config."""
    value = getattr(args, _dest(field, flag))
    if value is not None or tree is None:
        return f"{flag} {value}"
    from jaxmodel import run_config

    return f"{run_config.where(tree, f'inference.{field}')}: inference.{field}={inference_config(tree).__dict__[field]}"


# -- what generate and serve share: --config and its sections ----------------------------------------------------


def add_config_flag(p, command: str) -> None:
    p.add_argument("--config", metavar="C", help=f"a run config (YAML path or bundled name) whose inference: section "
                   f"(and mesh:) sets {command}'s engine; flags given override it")


def read_config(args, flags: dict[str, str]):
    """(run config tree or None, InferenceConfig): --config's `inference:` section with the given flags over it.
    Also pairs --group-size with the merged quantize (the parser does that only without --config)."""
    from jaxmodel.run_config import load_run_config

    tree = load_run_config(args.config, []) if args.config else None
    cfg = from_args(args, flags, tree)  # a ValueError names its flag or FILE:LINE (a user error)
    if args.config and args.group_size is not None and cfg.quantize != "int4":
        raise CommandError("--group-size needs --quantize int4")
    return tree, cfg


def config_mesh(tree):
    """--config's `mesh:` section as a mesh over this machine's devices, or None (no section, or one device)."""
    if tree is None or "mesh" not in tree:
        return None
    import math

    import jax

    from jaxmodel.run_config import mesh_shape, where
    from jaxmodel.sharding import ShardingError, make_mesh

    shape = mesh_shape(tree)
    try:
        sizes = shape.resolve(jax.device_count())
    except ShardingError as e:
        raise CommandError(f"{where(tree, 'mesh')}: {e} (or give --mesh)") from None
    return make_mesh(shape) if math.prod(sizes) > 1 else None
