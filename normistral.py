"""The `normistral` command: a thin dispatcher; every subcommand's logic is an importable function.

Subcommands: import-hf, export-hf, parity, compile-check, build-tokenizer, prepare-data, train, generate, demo.
Errors that a user can cause (a bad path, a checkpoint that does not match its config, ...) print one line
`normistral: error: ...` and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _import_hf(args):
    from jaxmodel.convert import import_hf

    import_hf(args.hf_dir, args.ckpt_dir, allow_pickle=args.allow_pickle)
    print(f"imported {args.hf_dir} -> {args.ckpt_dir}")


def _export_hf(args):
    from jaxmodel.convert import export_hf

    export_hf(args.ckpt_dir, args.hf_dir, dtype=args.dtype)
    print(f"exported {args.ckpt_dir} -> {args.hf_dir}")


def _parity(args):
    from jaxmodel.parity import compare_logits

    result = compare_logits(args.hf_dir, args.jax_dir or args.hf_dir, length=args.length, offset=args.offset)
    print(json.dumps(result))
    if result["max_abs_logit_diff"] > args.tolerance:
        raise SystemExit(f"normistral: error: logits differ by {result['max_abs_logit_diff']:.3g} "
                         f"> {args.tolerance:g}")


class CommandError(ValueError):
    """A usage error the user can fix (printed as one line)."""


def _workload(tree: dict, mode: str) -> tuple[int, int]:
    """(batch, length) of the step to compile: the inference section for prefill/decode if present,
    else the training shapes."""
    inference, train = tree.get("inference") or {}, tree.get("train") or {}
    if mode != "train" and inference:
        batch, length = inference.get("batch_size"), inference.get("max_length")
    else:
        batch, length = train.get("global_batch_size"), train.get("seq_len")
    if not (isinstance(batch, int) and isinstance(length, int) and batch > 0 and length > 0):
        raise CommandError(f"{tree['_path']}: --mode {mode} needs positive integers "
                           + ("inference.batch_size and inference.max_length" if mode != "train" and inference
                              else "train.global_batch_size and train.seq_len"))
    return batch, length


def _compile_check(args):
    from jaxmodel import aot, run_config

    tree = run_config.load_run_config(args.config, args.set)
    t0 = time.time()
    if args.mode == "train":  # training/aot.py reads the run's sections itself (model.init_from included)
        from training.aot import compile_train

        report = compile_train(tree, args.topology)
        batch, length = report["global_batch_size"], report["seq_len"]
    else:
        config, mesh = run_config.model_config(tree), run_config.mesh_shape(tree)
        batch, length = _workload(tree, args.mode)
        if args.mode == "prefill" and (tree.get("inference") or {}).get("quantize"):
            raise CommandError("--mode prefill compiles the unquantized forward; for an inference config with "
                               "quantize use --mode decode (the whole generation program, prefill included)")
        if args.mode == "decode":  # inference/aot.py reads the inference section itself
            from inference.aot import compile_decode

            report = compile_decode(tree, args.topology)
        else:
            report = aot.compile_prefill(config, mesh, args.topology, batch_size=batch, seq_len=length)
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
    if "decode_step" in report:  # --mode decode: the above is the whole generation program; one step alone:
        step = report["decode_step"]
        print(f"  one decode step (cache donated): {step['device_bytes'] / 1024**3:.3f} GiB per device, "
              f"fits: {'yes' if step['fits'] else 'NO'}")
    if "compiler" in report:
        print(f"  compiler: {report['compiler']}")


def _add_distributed_flags(p) -> None:
    g = p.add_argument_group("multi-process runs (automatic on multi-host Cloud TPU slices; see docs/multihost.md)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, on every process")
    g.add_argument("--num-processes", type=int, metavar="N")
    g.add_argument("--process-id", type=int, metavar="I")
    g.add_argument("--heartbeat-timeout", type=int, default=30, metavar="S",
                   help="seconds before the others stop when a process dies (default 30)")


def _join(args) -> None:
    """Joins jax.distributed before anything touches a device (no-op for a single process)."""
    from jaxmodel.distributed import DistributedArgs, initialize

    if initialize(DistributedArgs(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)):
        # Native libraries (gloo) print connection chatter to file descriptor 1; send that to stderr and
        # keep Python's stdout on the real one, so results (JSON lines) stay clean.
        real_stdout = os.dup(1)
        sys.stdout.flush()
        os.dup2(2, 1)
        sys.stdout = os.fdopen(real_stdout, "w", buffering=1, encoding="utf-8")


def _train(args):
    _join(args)
    from training.documents import DataError
    from training.train import TrainingError, run_training

    try:
        summary = run_training(args.config, args.workdir, args.set)
    except (TrainingError, DataError) as e:
        raise CommandError(str(e)) from None
    state = "preempted at" if summary["preempted"] else "finished at"
    print(f"train: {state} step {summary['step']} (loss {summary['loss']}); metrics in "
          f"{os.path.join(summary['workdir'], 'metrics.jsonl')}")


def _build_tokenizer(args):
    from training.documents import DataError
    from training.tokenizer import train_tokenizer

    try:
        out = train_tokenizer(args.input, args.output, vocab_size=args.vocab_size, progress=True)
    except DataError as e:
        raise CommandError(str(e)) from None
    print(f"build-tokenizer: {args.vocab_size}-token tokenizer from {len(args.input)} files -> {out}")


def _prepare_data(args):
    from training.data import prepare_data
    from training.documents import DataError

    try:
        index = prepare_data(args.tokenizer, args.input, args.output, args.seq_len, weights=args.weights)
    except DataError as e:
        raise CommandError(str(e)) from None
    for source in index["sources"]:
        start, stop = source["rows"]
        print(f"  {source['name']}: {source['documents']} documents, {source['tokens']} tokens, "
              f"{stop - start} rows, weight {source['weight']:.3g}")
    print(f"prepare-data: {index['num_rows']} rows of {index['seq_len']} tokens -> {args.output}")


def _mesh_arg(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise CommandError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR sizes, e.g. 1,-1,1")
    return sizes


def _generate(args):
    _join(args)
    import jax
    from tqdm.auto import tqdm

    from inference.generator import Generator, read_jsonl
    from jaxmodel.hub import resolve_model
    from jaxmodel.storage import atomic_file

    model_dir = resolve_model(args.model_dir)  # a hub id -> its snapshot in the local cache
    if not os.path.isdir(model_dir):
        raise CommandError(f"{args.model_dir}: model directory not found")
    records = read_jsonl(args.input) if args.input else [{"text": t} for t in args.prompt or []]
    names = [f"{args.input}: prompt {i + 1}" if args.input else f"--prompt {i + 1}" for i in range(len(records))]
    mesh = None
    if args.mesh or jax.process_count() > 1:  # several processes: one mesh over all their devices
        from jaxmodel.sharding import make_mesh

        mesh = make_mesh(_mesh_arg(args.mesh or "1,-1,1"))
    tokenizer = None
    if args.tokenizer:
        import transformers

        tokenizer_dir = resolve_model(args.tokenizer)
        if not os.path.isdir(tokenizer_dir):
            raise CommandError(f"{args.tokenizer}: tokenizer directory not found")
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)  # never trust_remote_code
    gen = Generator.from_pretrained(model_dir, tokenizer=tokenizer, dtype=args.dtype, quantize=args.quantize,
                                    group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype, mesh=mesh)
    batches = gen.iter_records(
        records, max_new_tokens=args.max_new_tokens, stop="\n" if args.stop_at_newline else None,
        template=args.template.replace("\\n", "\n") if args.template else None,  # a typed \n is a newline
        batch_size=args.batch_size, names=names, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    primary = jax.process_index() == 0  # every process generates (collectives); process 0 reports
    with atomic_file(args.output if primary else None) as out, tqdm(
            total=len(records), unit="prompt", disable=not (args.input and primary), file=sys.stderr) as bar:
        for batch in batches:  # printed per batch, in input order; the output file appears only when complete
            for record in batch:
                line = json.dumps(record, ensure_ascii=False)
                if not primary:
                    continue
                if args.input:
                    bar.write(line, file=sys.stdout)  # above the progress bar
                else:
                    print(line, flush=True)
                if out:
                    out.write(line + "\n")
            bar.update(len(batch))


def _demo(args):
    from normistral_demo import run_demo

    run_demo(args.workdir, steps=args.steps)


# Weight quantization choices for every command that loads a model for inference (generate, serve). The
# same list as inference.quantize.MODES, spelled here because the parser must not import JAX (JAX reads
# JAX_PLATFORMS when imported, and _default_platform sets it after parsing); a test checks they agree.
QUANTIZE_CHOICES = ("int8", "int4")
MODEL_HELP = "a Hugging Face (or import-hf) directory with its tokenizer, or a hub model id org/name[@revision]"


def add_quantize_flags(p) -> None:
    """--quantize and --group-size (generate and serve)."""
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="weight-only int8 (per-output-channel scales) or int4 (per-group scales, packed), "
                        "quantized tensor by tensor while loading")
    p.add_argument("--group-size", type=int, default=128, metavar="G",
                   help="int4: inputs per scale (default 128; the whole axis where G does not divide it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normistral", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-hf", help="Hugging Face directory (or hub id) -> Orbax checkpoint directory")
    p.add_argument("hf_dir", help="a Hugging Face directory or hub model id org/name[@revision]")
    p.add_argument("ckpt_dir")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model*.bin (only through torch.load(weights_only=True))")
    p.set_defaults(func=_import_hf)

    p = sub.add_parser("export-hf", help="Orbax checkpoint directory -> Hugging Face directory")
    p.add_argument("ckpt_dir")
    p.add_argument("hf_dir")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="tensor dtype in the output (default: the dtype of the imported checkpoint)")
    p.set_defaults(func=_export_hf)

    p = sub.add_parser("parity", help="compare logits with transformers (float32)")
    p.add_argument("hf_dir", help="a Hugging Face directory or hub model id org/name[@revision]")
    p.add_argument("jax_dir", nargs="?", help="directory (or hub id) our model loads (default: hf_dir)")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--offset", type=int, default=30000, help="first RoPE position")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.set_defaults(func=_parity)

    p = sub.add_parser("compile-check", help="compile a step ahead of time for a TPU topology; report memory")
    p.add_argument("--config", required=True, help="a run config YAML, or a bundled config's name")
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:2x2, v6e:1x1")
    p.add_argument("--mode", choices=["train", "prefill", "decode"], default="prefill")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_compile_check)

    p = sub.add_parser("train", help="train (or resume) per a run config; metrics in WORKDIR/metrics.jsonl")
    p.add_argument("--config", required=True, help="a run config YAML, or a bundled config's name, e.g. tiny-cpu")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and prepared data; rerun to resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    _add_distributed_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("build-tokenizer", help="train a NorMistral-style byte-level BPE tokenizer on text files")
    p.add_argument("--input", required=True, nargs="+", action="extend", metavar="FILE",
                   help=".jsonl (one document per line, field 'text') or text (documents split by blank lines)")
    p.add_argument("--output", required=True, help="new Hugging Face tokenizer directory")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.set_defaults(func=_build_tokenizer)

    p = sub.add_parser("prepare-data", help="tokenize and pack text files into memory-mapped training rows")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer directory")
    p.add_argument("--input", required=True, nargs="+", action="extend", metavar="FILE",
                   help="one source per file: .jsonl (field 'text') or text (documents split by blank lines)")
    p.add_argument("--output", required=True, help="new data directory (must not exist or be empty)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="sampling weight per input, in order (default: each source by its size)")
    p.set_defaults(func=_prepare_data)

    p = sub.add_parser("generate", help="greedy (or sampled) generation from a model directory; JSON lines out")
    p.add_argument("model_dir", help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT", help="one or more prompts")
    src.add_argument("--input", metavar="FILE.jsonl", help='one prompt per line: {"text": ...} (other fields kept)')
    p.add_argument("--template", help='format string for each prompt, e.g. "Engelsk: {0}\\nBokmål:" (\\n: newline)')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation call")
    p.add_argument("--stop-at-newline", action="store_true",
                   help="stop a row at any token containing a newline (the model card's stop set)")
    p.add_argument("--output", metavar="FILE.jsonl", help="also write the results here (one JSON object per line)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    add_quantize_flags(p)
    p.add_argument("--kv-cache-dtype", choices=["int8"], help="int8 KV cache (default: the compute dtype)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a Hugging Face tokenizer directory or hub id (default: MODEL_DIR's)")
    p.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                   help="shard the model over a device mesh (default: one device; 1,-1,1 with several processes)")
    _add_distributed_flags(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("demo", help="the end-to-end run on a tiny local checkpoint (the Quickstart's main job)")
    p.add_argument("--workdir", default="demo-run", help="created (or a previous demo's, replaced)")
    p.add_argument("--steps", type=int, default=300, help="training steps (the run stops halfway and resumes)")
    p.set_defaults(func=_demo)
    return parser


def _default_platform() -> None:
    """With the [tpu] extra installed on a machine without a TPU (a laptop, CI, this repository's CPU
    machines), JAX would first probe libtpu, which prints a page of warnings; go straight to the CPU
    there. A TPU VM (it has /dev/accel* or /dev/vfio devices), a CUDA install, or an explicit
    JAX_PLATFORMS are left alone."""
    import glob
    import importlib.util

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    _default_platform()
    if args.command == "compile-check":
        # Before JAX loads: compile on the CPU backend, and share libtpu with any other process (it
        # takes a machine-wide lock when it loads; compiling for a topology description needs no chip).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from inference.generate import GenerateError
    from jaxmodel.aot import TopologyError
    from jaxmodel.config import ConfigError
    from jaxmodel.convert import ConvertError
    from jaxmodel.distributed import DistributedError
    from jaxmodel.sharding import ShardingError
    from jaxmodel.storage import StorageError

    try:
        args.func(args)
    except (ConfigError, ConvertError, ShardingError, TopologyError, CommandError, GenerateError, DistributedError,
            StorageError, FileNotFoundError, NotADirectoryError, FileExistsError) as e:
        print(f"normistral: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
