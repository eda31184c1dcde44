"""The command line's shared parts, and the commands that drive jaxmodel/ alone (import-hf, export-hf, parity).

Inside:
- `CommandError` (a usage error: one line `normistral: error: ...`, exit 2), `fail`, and the signal state the
  handlers share (`mark_terminated`, `interruption`, `sigterm_as_ctrl_c`).
- `Parser`: argparse with the one error format and no abbreviations; it pairs --group-size with --quantize.
- Flag types, each naming its range (`integer`, `positive_int`, `non_negative_int`, `positive_float`,
  `non_negative_float`, `unit_interval`, `ranged`, `limit`, `memory`), and the flag groups defined once:
  `add_quantize_flags` (--lora, --quantize, --group-size), `add_pool_flags`, `add_compile_cache_flag`,
  `add_mesh_flag`, `add_distributed_flags`, with their run-time halves `join`, `mesh_arg`, `check_lora`,
  `compile_cache`.
- compile-check's parser and its shared half (`compile_check`): the modes are the packages' (training/cli.py,
  inference/cli.py), passed in by normistral.py, since jaxmodel/ imports neither package.
- `add_commands(subparsers)`: import-hf, export-hf, parity.

Nothing here imports JAX at module level: the parser runs before `JAX_PLATFORMS` is settled, and `--help`
and a bad flag must answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


class CommandError(ValueError):
    """A usage error the user can fix (printed as one line)."""


# -- errors and signals (the state normistral.py's handlers and the commands share) ------------------------------

_terminated = False  # set on SIGTERM: the KeyboardInterrupt that follows came from SIGTERM


def mark_terminated() -> None:
    global _terminated
    _terminated = True


def interruption() -> tuple[str, int]:
    """What stopped the run, for the error line, and the exit status (128 + the signal's number)."""
    return ("terminated (SIGTERM)", 143) if _terminated else ("interrupted (Ctrl-C)", 130)


def sigterm_as_ctrl_c(signum, frame):
    """A SIGTERM handler raising KeyboardInterrupt (main() reports "terminated (SIGTERM)", status 143)."""
    mark_terminated()
    raise KeyboardInterrupt


def close_progress_bars() -> None:
    """Closes every tqdm bar still open: a bar's last write ends in a carriage return, and the error
    printed next must start on a line of its own (a closed bar ends its line)."""
    bars = set()
    for name in ("tqdm.std", "tqdm.asyncio", "tqdm.auto", "tqdm.notebook"):  # each class keeps its own set
        module = sys.modules.get(name)
        for cls in vars(module).values() if module else ():
            if isinstance(cls, type) and "_instances" in vars(cls):
                bars.update(cls._instances)
    for bar in bars:
        try:
            bar.close()
        except Exception:  # noqa: BLE001 (a half-torn-down bar must not hide the error being reported)
            pass


def fail(message: str, status: int = 2):
    """Prints `normistral: error: MESSAGE` on a line of its own and exits with `status`."""
    close_progress_bars()
    sys.stdout.flush()
    start = "\n" if getattr(sys.stderr, "mid_line", False) else ""  # normistral.py's line-tracking stderr
    print(f"{start}normistral: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status) from None


# -- flag types: argparse adds the flag (`argument --batch-size: must be a positive integer, got 0`), and
# they run while the command line is parsed, before any work. ------------------------------------------------


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def integer(text: str) -> int:
    return _number(text, int)


def ranged(kind, accept, what: str):
    """An argparse type: `kind` parsed by `_number`, refused unless `accept(value)`, naming `what`."""
    def parse(text: str):
        value = _number(text, kind)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must {what}, got {text.strip()}")
        return value
    return parse


positive_int = ranged(int, lambda v: v > 0, "be a positive integer")
non_negative_int = ranged(int, lambda v: v >= 0, "be a non-negative integer")
positive_float = ranged(float, lambda v: v > 0, "be a positive number")
non_negative_float = ranged(float, lambda v: v >= 0, "be a non-negative number")
unit_interval = ranged(float, lambda v: 0 < v <= 1, "lie in (0, 1]")


def limit(text: str) -> int | float:
    """eval --limit as lm-eval defines it: a count of documents (an integer, at least 1), or a fraction of
    each task's documents (a number in (0, 1))."""
    value = _number(text, float)
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a whole number of documents (1 or more) or a fraction below 1, "
                                         f"got {text.strip()}")
    return int(value) if value >= 1 else value


def memory(text: str) -> int | float:
    """--kv-cache-memory: bytes (4GiB, 512MiB, 123456) or a fraction in (0, 1] of free device memory (0.9)."""
    from jaxmodel.checks import memory_amount  # no JAX import: the parser runs before JAX_PLATFORMS is settled

    try:
        return memory_amount(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Parser(argparse.ArgumentParser):
    """argparse with the one error format: usage, then `normistral: error: ...` as the last line (exit 2).
    Abbreviations are off (for every subcommand too: subparsers are made of this class): `--stop` must not
    quietly become `--stop-at-newline`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # Only the subcommand that has the flag; with --config the section's quantize counts too, so the pair
        # is checked after the section is read (inference/config.py).
        if "--group-size" in self._option_string_actions and getattr(namespace, "config", None) is None:
            check_group_size(namespace, self.error)
        return namespace, extras

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"normistral: error: {message}\n")


# -- flag groups, defined once -----------------------------------------------------------------------------------

# Weight quantization choices for every command that loads a model for inference (generate, serve, eval). The
# same list as inference.quantize.MODES, spelled here because the parser must not import JAX (JAX reads
# JAX_PLATFORMS when imported, and normistral.py sets it after parsing); a test checks they agree.
QUANTIZE_CHOICES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128  # inference.quantize.DEFAULT_GROUP_SIZE (not imported here: see above)
DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = "a Hugging Face (or import-hf) directory with its tokenizer, or a hub model id org/name[@revision]"


def add_quantize_flags(p) -> None:
    """--quantize and --group-size (generate, serve and eval); check_group_size pairs them after parsing.
    Also --lora, the other load-time change to the weights (merged before quantizing)."""
    p.add_argument("--lora", metavar="ADAPTER_DIR",
                   help="a PEFT LoRA adapter (directory, gs:// or hub id org/name[@rev]) merged into the weights "
                        "at load, before --quantize")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="weight-only int8 (per-output-channel scales) or int4 (per-group scales, packed), "
                        "quantized tensor by tensor while loading")
    p.add_argument("--group-size", type=positive_int, metavar="G",
                   help=f"with --quantize int4: inputs per scale (default {DEFAULT_GROUP_SIZE}; the whole axis where "
                        "G does not divide it)")


def check_group_size(args, error) -> None:
    """--group-size means something only for int4: refused otherwise (it would be ignored); then the default."""
    if args.group_size is not None and args.quantize != "int4":
        error("--group-size needs --quantize int4")
    if args.group_size is None:
        args.group_size = DEFAULT_GROUP_SIZE


def add_pool_flags(p, *, seqs: bool = True) -> None:
    """The engine's KV cache pool (serve; generate without --max-num-seqs, its --batch-size is that) and
    the persistent compilation cache. Defaults are None: a flag not given leaves the --config section's value
    (inference/config.py has the defaults)."""
    if seqs:
        p.add_argument("--max-num-seqs", "--slots", dest="max_num_seqs", type=positive_int, metavar="N",
                       help="sequences decoded together at most (default 8; --slots is the old name)")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="the longest sequence, prompt + completion, in tokens (default: the model's context)")
    p.add_argument("--kv-cache-memory", type=memory, metavar="BYTES|FRACTION",
                   help="the KV cache's pool of pages: bytes (4GiB, 512MiB, 123456) or a fraction of the device "
                        "memory free after the weights (0.9); default: pages for N sequences of --max-model-len "
                        "tokens, at most 0.9 of the free memory")
    p.add_argument("--page-size", type=positive_int, metavar="TOKENS", help="tokens per KV cache page (default 16)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="do not reuse the cached pages of earlier prompts' common prefixes")
    add_compile_cache_flag(p)


def add_compile_cache_flag(p) -> None:
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache ($XDG_CACHE_HOME/normistral/jax or "
                        "~/.cache/normistral/jax; NORMISTRAL_COMPILE_CACHE=0 turns it off too)")


def compile_cache(args) -> None:
    """JAX's persistent compilation cache (jaxmodel/compile_cache.py), on unless --no-compile-cache or
    NORMISTRAL_COMPILE_CACHE=0; set before anything compiles."""
    from jaxmodel import compile_cache as cache

    try:
        cache.enable(not args.no_compile_cache)
    except cache.CompileCacheError as e:
        raise CommandError(str(e)) from None


def add_mesh_flag(p, help: str) -> None:
    p.add_argument("--mesh", metavar="DATA,FSDP,TENSOR", help=help)


def mesh_arg(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise CommandError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR sizes, e.g. 1,-1,1")
    return sizes


def add_distributed_flags(p) -> None:
    g = p.add_argument_group("multi-process runs (automatic where JAX detects a cluster: TPU pods, Slurm, "
                             "Open MPI; see docs/multihost.md)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, on every process")
    g.add_argument("--num-processes", type=positive_int, metavar="N")
    g.add_argument("--process-id", type=non_negative_int, metavar="I")
    g.add_argument("--heartbeat-timeout", type=positive_int, default=30, metavar="S",
                   help="seconds before the others stop when a process dies (default 30)")


def join(args) -> None:
    """Joins jax.distributed before anything touches a device (no-op for a single process)."""
    from jaxmodel.distributed import DistributedArgs, initialize

    if initialize(DistributedArgs(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)):
        # Native libraries (gloo) print connection chatter to file descriptor 1; send that to stderr and
        # keep Python's stdout on the real one, so results (JSON lines) stay clean.
        real_stdout = os.dup(1)
        sys.stdout.flush()
        os.dup2(2, 1)
        sys.stdout = os.fdopen(real_stdout, "w", buffering=1, encoding="utf-8")


def check_lora(args, config) -> str | None:
    """--lora's adapter (a hub id fetched) checked against the model's config, before the weights load."""
    if args.lora is None:
        return None
    from jaxmodel.convert import resolve_lora
    from jaxmodel.lora import LoraError, error_line

    try:
        return resolve_lora(args.lora, config)
    except LoraError as e:
        raise CommandError(error_line(e, "--lora ", args.lora)) from None


# -- compile-check: the parser and the half every mode shares ----------------------------------------------------

ENGINE_FLAGS = (("--max-model-len", "max_model_len"), ("--max-num-seqs", "max_num_seqs"),
                ("--kv-cache-memory", "kv_cache_memory"), ("--page-size", "page_size"))


def add_compile_check(sub, handler) -> None:
    p = sub.add_parser("compile-check", help="compile a step ahead of time for a TPU topology; report memory")
    p.add_argument("--config", required=True, help="a run config YAML, or a bundled config's name")
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:2x2, v6e:1x1")
    p.add_argument("--mode", choices=["train", "prefill", "decode"], default="prefill",
                   help="what to compile: prefill (the default: one forward over the inference section's batch "
                        "and length, else the training shapes), decode (the whole generation program, its decode "
                        "step and the serving engine's steps) or train (one training step)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    for flag, key in ENGINE_FLAGS:
        p.add_argument(flag, metavar="VALUE", help=f"--mode decode: the engine's inference.{key} (as --set)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workdir", help="--mode train: the run's --workdir, so its data is checked as train checks it")
    p.add_argument("--check-data", action="store_true",
                   help="--mode train: also read remote (gs://) data, and fail if the data is missing (default: "
                        "local data that exists is checked, the rest reported as not checked)")
    p.set_defaults(func=handler)


def compile_check(args, modes: dict, check_sections, print_extra) -> None:
    """compile-check: the topology and the engine flags, every section of the config, the attention kernel,
    then `modes[args.mode](tree, args) -> (report, batch, length)` and the report (`print_extra(report)`
    prints what a mode adds)."""
    from jaxmodel import aot, run_config

    aot.check_topology(args.topology)
    overrides = {key: getattr(args, key) for _, key in ENGINE_FLAGS}
    if args.mode != "decode" and any(v is not None for v in overrides.values()):
        raise CommandError("--max-model-len, --max-num-seqs, --kv-cache-memory and --page-size are the engine's: "
                           "they need --mode decode")
    tree = run_config.load_run_config(args.config, args.set + [f"inference.{k}={v}" for k, v in overrides.items()
                                                               if v is not None])
    check_sections(tree)
    aot.check_attention(tree, args.topology)
    t0 = time.time()
    report, batch, length = modes[args.mode](tree, args)
    report.update(config=os.path.basename(args.config), compile_seconds=round(time.time() - t0, 1))
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['mode']} on {args.topology} ({report['devices']} x {report['device_kind']}), "
          f"mesh {report['mesh']}, batch {batch} x {length} tokens")
    for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "device_bytes", "hbm_bytes"):
        value = report[key]
        shown = "-" if value is None else f"{value / 1024**3:9.3f} GiB"
        print(f"  {key:15s} {shown} per device")
    print(f"  fits: {'yes' if report['fits'] else 'NO'} (compiled in {report['compile_seconds']}s)")
    print_extra(report)
    if "data" in report:
        print(f"  data: {report['data']}")
    if "compiler" in report:
        print(f"  compiler: {report['compiler']}")


# -- import-hf, export-hf, parity --------------------------------------------------------------------------------


def _import_hf(args):
    from jaxmodel.convert import import_hf

    import_hf(args.hf_dir, args.ckpt_dir, allow_pickle=args.allow_pickle)
    print(f"imported {args.hf_dir} -> {args.ckpt_dir}")


def _export_hf(args):
    from jaxmodel.export import export_hf
    from jaxmodel.lora import LoraError, error_line

    try:
        export_hf(args.ckpt_dir, args.hf_dir, dtype=args.dtype, merge_lora=args.merge_lora)
    except LoraError as e:
        raise CommandError(error_line(e, "--merge-lora ", args.merge_lora)) from None
    print(f"exported {args.ckpt_dir} -> {args.hf_dir}")


def _parity(args):
    from jaxmodel.parity import compare_layers, compare_logits

    if args.whole_model:
        result = compare_logits(args.hf_dir, args.jax_dir or args.hf_dir, length=args.length, offset=args.offset)
        print(json.dumps(result))
        if result["max_abs_logit_diff"] > args.tolerance:
            raise SystemExit(f"normistral: error: logits differ by {result['max_abs_logit_diff']:.3g} "
                             f"> {args.tolerance:g}")
        return
    result = compare_layers(args.hf_dir, args.jax_dir or args.hf_dir, length=args.length, offset=args.offset,
                            progress=True)
    for stage in result["stages"]:  # one line per stage on stderr; the JSON result on stdout
        print(f"  {stage['stage']:12s} max |difference| {stage['max_abs_diff']:.3g} (values up to "
              f"{stage['max_abs']:.3g})", file=sys.stderr)
    print(json.dumps(result))
    worst = result["worst"]
    if worst["max_abs_diff"] > args.tolerance:
        raise SystemExit(f"normistral: error: {worst['stage']} differs by {worst['max_abs_diff']:.3g} > "
                         f"{args.tolerance:g} (fed the reference's inputs; the other stages are listed above)")


def add_commands(sub) -> None:
    """Registers import-hf, export-hf and parity."""
    p = sub.add_parser("import-hf", help="Hugging Face directory (or hub id) -> Orbax checkpoint directory")
    p.add_argument("hf_dir", help="a Hugging Face directory or hub model id org/name[@revision]")
    p.add_argument("ckpt_dir")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model*.bin (only through torch.load(weights_only=True))")
    p.set_defaults(func=_import_hf)

    p = sub.add_parser("export-hf", help="Orbax checkpoint directory -> Hugging Face directory")
    p.add_argument("ckpt_dir")
    p.add_argument("hf_dir")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="tensor dtype in the output (default: the dtype of the imported checkpoint)")
    p.add_argument("--merge-lora", metavar="ADAPTER_DIR",
                   help="fold a PEFT LoRA adapter (directory, gs:// or hub id) into the exported weights")
    p.set_defaults(func=_export_hf)

    p = sub.add_parser("parity", help="compare with transformers layer by layer (float32; one layer of each at a time)")
    p.add_argument("hf_dir", help="a Hugging Face directory or hub model id org/name[@revision]")
    p.add_argument("jax_dir", nargs="?", help="directory (or hub id) our model loads (default: hf_dir)")
    p.add_argument("--length", type=positive_int, default=256)
    p.add_argument("--offset", type=non_negative_int, default=30000, help="first RoPE position")
    p.add_argument("--tolerance", type=non_negative_float, default=1e-4)
    p.add_argument("--whole-model", action="store_true",
                   help="load both whole models and compare the logits only (needs both in memory)")
    p.set_defaults(func=_parity)
