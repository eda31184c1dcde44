"""The commands that drive training/: build-tokenizer, prepare-data, train, export-lora, and compile-check's
train mode (`compile_train_mode`).

`add_commands(subparsers, check_sections=..., eval_hook=...)` registers them. The trainer's evaluation
hook (`train.eval_tasks`) runs lm-eval, which lives in inference/; training/ does not import inference/, so
normistral.py passes the hook's factory in (inference/cli.py `train_eval_hook(run, workdir)`), and the check
of every config section (the inference section's too).
"""

from __future__ import annotations

from jaxmodel.cli import CommandError, add_distributed_flags, fail, interruption, join, positive_int


def _train(args, check_sections, eval_hook):
    join(args)
    from jaxmodel.run_config import load_run_config
    from training.config import load
    from training.documents import DataError

    tree = load_run_config(args.config, args.set)
    check_sections(tree)  # every section (inference's too), before data or compiling
    run = load(tree)
    hook = eval_hook(run, args.workdir) if run.train.eval_tasks and eval_hook else None
    from training.train import TrainingError, run_training

    try:
        summary = run_training(args.config, args.workdir, args.set, eval_hook=hook)
    except (TrainingError, DataError) as e:
        raise CommandError(str(e)) from None
    if summary.get("nothing_to_do"):  # the checkpoint is at train.steps (a lower train.steps is an error)
        exported = f"; exported to {summary['exported']}" if summary.get("exported") else ""
        print(f"train: nothing to do: {summary['workdir']} is at step {summary['step']} = train.steps{exported}")
        return
    state = "preempted at" if summary["preempted"] else "finished at"
    loss = "" if summary["loss"] is None else f" (loss {summary['loss']})"  # None: preempted before a step
    print(f"train: {state} step {summary['step']}{loss}; metrics in {summary['workdir'].rstrip('/')}/metrics.jsonl")


def _build_tokenizer(args):
    from training.documents import DataError
    from training.tokenizer import train_tokenizer

    try:
        out = train_tokenizer(args.input, args.output, vocab_size=args.vocab_size, progress=True)
    except DataError as e:
        raise CommandError(str(e)) from None
    print(f"build-tokenizer: {args.vocab_size}-token tokenizer from {len(args.input)} files -> {out}")


def _prepare_data(args):
    from training.documents import DataError
    from training.prepare import prepare_data

    try:
        index = prepare_data(args.tokenizer, args.input, args.output, args.seq_len, weights=args.weights,
                             workers=args.workers, unit_bytes=int(args.unit_mb * 2**20),
                             text_column=args.text_column, engine=args.engine, prompt_field=args.prompt_field,
                             completion_field=args.completion_field,
                             template=None if args.template is None else args.template.replace("\\n", "\n"))
    except DataError as e:
        raise CommandError(str(e)) from None
    except KeyboardInterrupt:  # the bar is closed and the temporaries removed by now
        what, status = interruption()
        fail(f"{what}; rerun the same command to resume ({args.output})", status=status)
    for source in index["sources"]:
        start, stop = source["rows"]
        trained = f" ({source['trained_tokens']} trained)" if "trained_tokens" in source else ""
        print(f"  {source['name']}: {source['documents']} {'records' if trained else 'documents'}, "
              f"{source['tokens']} tokens{trained}, {stop - start} rows, weight {source['weight']:.3g}")
    print(f"prepare-data: {index['num_rows']} rows of {index['seq_len']} tokens -> {args.output}")


def _export_lora(args):
    from training.lora_train import export_lora

    print(export_lora(args.workdir, args.out))


def compile_train_mode(tree: dict, args) -> tuple[dict, int, int]:
    """compile-check --mode train: training/aot.py reads the run's sections itself (model.init_from included)."""
    from training.aot import compile_train

    report = compile_train(tree, args.topology, workdir=args.workdir, check_data=args.check_data)
    return report, report["global_batch_size"], report["seq_len"]


def add_commands(sub, *, check_sections, eval_hook) -> None:
    """Registers train, build-tokenizer, prepare-data and export-lora. `check_sections(tree)` reads every
    section of a run config; `eval_hook(run, workdir)` builds the `train.eval_tasks` hook (checking the tasks
    before training starts)."""
    p = sub.add_parser("train", help="train (or resume) per a run config; metrics in WORKDIR/metrics.jsonl")
    p.add_argument("--config", required=True, help="a run config YAML, or a bundled config's name, e.g. tiny-cpu")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and prepared data; rerun to resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    add_distributed_flags(p)
    p.set_defaults(func=lambda args: _train(args, check_sections, eval_hook))

    p = sub.add_parser("build-tokenizer", help="train a NorMistral-style byte-level BPE tokenizer on text files")
    p.add_argument("--input", required=True, nargs="+", action="extend", metavar="FILE",
                   help=".jsonl (one document per line, field 'text') or text (documents split by blank lines)")
    p.add_argument("--output", required=True, help="new Hugging Face tokenizer directory")
    p.add_argument("--vocab-size", type=positive_int, default=4096)
    p.set_defaults(func=_build_tokenizer)

    p = sub.add_parser("prepare-data", help="tokenize and pack text into memory-mapped training rows (resumable)")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer directory (local or gs://)")
    p.add_argument("--input", required=True, nargs="+", action="extend", metavar="SOURCE",
                   help="one source each: a .jsonl or .txt file (each also .gz, .zst, .bz2, .xz), a .parquet file "
                        "(letter case ignored), a directory or glob of them, a save_to_disk dataset directory, or "
                        "hf:NAME[:CONFIG]:SPLIT; local or gs://")
    p.add_argument("--output", required=True, help="new data directory, local or gs:// (rerun to resume)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="sampling weight per input, in order (default: each source by its size)")
    p.add_argument("--workers", type=int, help="worker processes on this machine (default: all cores)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="ray: run the units as tasks on the Ray cluster ray.init() finds (RAY_ADDRESS)")
    p.add_argument("--text-column",
                   help="the text field of JSON lines, the text column of Parquet and dataset inputs (default: text)")
    p.add_argument("--prompt-field", help="read prompt/completion records (JSON lines, Parquet, datasets) and train "
                   "only on the completions: the prompt's field (default: prompt)")
    p.add_argument("--completion-field", help="the completion's field of such records (default: completion)")
    p.add_argument("--template", help="format string for each record's prompt, as generate takes it, e.g. "
                   '"Engelsk: {0}\\nBokmål:" (\\n: newline); implies prompt/completion records')
    p.add_argument("--unit-mb", type=float, default=32, help="MiB of input per work unit (part of the output's "
                   "layout: keep it when resuming)")
    p.set_defaults(func=_prepare_data)

    p = sub.add_parser("export-lora", help="a LoRA run's latest adapters -> a PEFT adapter directory")
    p.add_argument("workdir", help="the LoRA run's --workdir (local or gs://)")
    p.add_argument("out", help="new PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.set_defaults(func=_export_lora)
