"""The `normistral` command: a thin dispatcher; every subcommand's logic is an importable function.

Subcommands: import-hf, export-hf, parity, compile-check, build-tokenizer, prepare-data, train, generate, serve, eval,
demo.
Errors that a user can cause (a bad path, a checkpoint that does not match its config, ...) print one line
`normistral: error: ...` and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def _import_hf(args):
    from jaxmodel.convert import import_hf

    import_hf(args.hf_dir, args.ckpt_dir, allow_pickle=args.allow_pickle)
    print(f"imported {args.hf_dir} -> {args.ckpt_dir}")


def _export_hf(args):
    from jaxmodel.convert import export_hf
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


class CommandError(ValueError):
    """A usage error the user can fix (printed as one line)."""


# argparse types that name their range; argparse adds the flag (`argument --batch-size: must be a positive
# integer, got 0`) and they run while the command line is parsed, before any work.
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


def _ranged(kind, accept, what: str):
    """An argparse type: `kind` parsed by `_number`, refused unless `accept(value)`, naming `what`."""
    def parse(text: str):
        value = _number(text, kind)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must {what}, got {text.strip()}")
        return value
    return parse


positive_int = _ranged(int, lambda v: v > 0, "be a positive integer")
non_negative_int = _ranged(int, lambda v: v >= 0, "be a non-negative integer")
positive_float = _ranged(float, lambda v: v > 0, "be a positive number")
non_negative_float = _ranged(float, lambda v: v >= 0, "be a non-negative number")
unit_interval = _ranged(float, lambda v: 0 < v <= 1, "lie in (0, 1]")


def _limit(text: str) -> int | float:
    """eval --limit as lm-eval defines it: a count of documents (an integer, at least 1), or a fraction of
    each task's documents (a number in (0, 1))."""
    value = _number(text, float)
    if value <= 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a whole number of documents (1 or more) or a fraction below 1, "
                                         f"got {text.strip()}")
    return int(value) if value >= 1 else value


class _Parser(argparse.ArgumentParser):
    """argparse with the one error format: usage, then `normistral: error: ...` as the last line (exit 2).
    Abbreviations are off (for every subcommand too: subparsers are made of this class): `--stop` must not
    quietly become `--stop-at-newline`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if "--group-size" in self._option_string_actions:  # only the subcommand that has the flag
            _check_group_size(self, namespace)
        return namespace, extras

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"normistral: error: {message}\n")


def _workload(tree: dict, mode: str) -> tuple[int, int]:
    """(batch, length) of the step to compile: the inference section for prefill/decode if present (its
    defaults fill what it leaves out), else the training shapes."""
    inference, train = tree.get("inference") or {}, tree.get("train") or {}
    if mode != "train" and inference:
        from inference.aot import inference_options

        opts = inference_options(tree)
        return opts.batch_size, opts.max_length
    batch, length = train.get("global_batch_size"), train.get("seq_len")
    if not (isinstance(batch, int) and isinstance(length, int) and batch > 0 and length > 0):
        from jaxmodel.run_config import where

        raise CommandError(f"{where(tree, 'train')}: --mode {mode} needs train.global_batch_size and "
                           "train.seq_len (or an inference section)")
    return batch, length


def _check_sections(tree: dict) -> None:
    """Reads every section of a run config (model, mesh, train, optimizer, data, checkpoint, inference), so an
    unknown key or a bad value anywhere is an error whichever command reads the file."""
    from training.config import load

    load(tree)
    if tree.get("inference") is not None:
        from inference.aot import inference_options

        inference_options(tree)


def _gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1024**3:.3f} GiB"  # None: a program that was not compiled


def _compile_check(args):
    from jaxmodel import aot, run_config

    aot.check_topology(args.topology)
    overrides = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                 "kv_cache_memory": args.kv_cache_memory, "page_size": args.page_size}
    if args.mode != "decode" and any(v is not None for v in overrides.values()):
        raise CommandError("--max-model-len, --max-num-seqs, --kv-cache-memory and --page-size are the engine's: "
                           "they need --mode decode")
    tree = run_config.load_run_config(args.config, args.set + [f"inference.{k}={v}" for k, v in overrides.items()
                                                               if v is not None])
    _check_sections(tree)
    aot.check_attention(tree, args.topology)
    t0 = time.time()
    if args.mode == "train":  # training/aot.py reads the run's sections itself (model.init_from included)
        from training.aot import compile_train

        report = compile_train(tree, args.topology, workdir=args.workdir, check_data=args.check_data)
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
    if "engine" in report:  # --mode decode: the continuous-batching engine (normistral serve, Generator)
        _print_engine(report["engine"])
    if "data" in report:
        print(f"  data: {report['data']}")
    if "compiler" in report:
        print(f"  compiler: {report['compiler']}")


def _print_engine(eng: dict) -> None:
    pool = eng["pool"]
    ratio = f", laid out {pool['layout_ratio']:.3f}x" if pool.get("layout_ratio") else ""
    print(f"  engine: up to {eng['max_num_seqs']} sequences of up to {eng['max_model_len']} tokens; KV cache pool "
          f"{pool['pages']} pages x {eng['page_size']} = {pool['tokens']} tokens, {_gib(pool['bytes'])} "
          f"({pool['values_bytes_per_token']:.0f} bytes a token{ratio}; {pool['sizing']})")
    print(f"  engine: {eng['max_concurrent_seqs']} sequences of {eng['average_len']} tokens at once; one of "
          f"{eng['max_model_len']}: {'yes' if eng['pool_holds_max_model_len'] else 'NO'}")
    for name, step in eng["steps"].items():
        print(f"  engine {name}: {_gib(step['device_bytes'])} per device, fits: {'yes' if step['fits'] else 'NO'}")
    print(f"  engine fits: {'yes' if eng['fits'] else 'NO'} ({len(eng['steps'])} of its {eng['programs']} programs "
          "compiled: the narrowest and the widest)")
    if "compiler" in eng:
        print(f"  engine compiler: {eng['compiler']}")


def _add_distributed_flags(p) -> None:
    g = p.add_argument_group("multi-process runs (automatic where JAX detects a cluster: TPU pods, Slurm, "
                             "Open MPI; see docs/multihost.md)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, on every process")
    g.add_argument("--num-processes", type=positive_int, metavar="N")
    g.add_argument("--process-id", type=non_negative_int, metavar="I")
    g.add_argument("--heartbeat-timeout", type=positive_int, default=30, metavar="S",
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
    from jaxmodel.run_config import load_run_config
    from training.documents import DataError

    _check_sections(load_run_config(args.config, args.set))  # every section, before data or compiling
    from training.train import TrainingError, run_training

    try:
        summary = run_training(args.config, args.workdir, args.set, eval_hook=_train_eval_hook(args))
    except (TrainingError, DataError) as e:
        raise CommandError(str(e)) from None
    if summary.get("nothing_to_do"):  # the checkpoint is at train.steps (a lower train.steps is an error)
        exported = f"; exported to {summary['exported']}" if summary.get("exported") else ""
        print(f"train: nothing to do: {summary['workdir']} is at step {summary['step']} = train.steps{exported}")
        return
    state = "preempted at" if summary["preempted"] else "finished at"
    loss = "" if summary["loss"] is None else f" (loss {summary['loss']})"  # None: preempted before a step
    print(f"train: {state} step {summary['step']}{loss}; metrics in {summary['workdir'].rstrip('/')}/metrics.jsonl")


def _train_eval_hook(args):
    """The `train.eval_tasks` hook: lm-eval on the run's current weights (None when the run has no tasks).
    The tasks are checked here, before training starts; the tokenizer is found at the first evaluation
    (the run may build it): model.init_from's, else WORKDIR/<data.tokenizer_dir>."""
    from jaxmodel.run_config import load_run_config
    from training.config import load

    run = load(load_run_config(args.config, args.set))
    train = run.train
    if not train.eval_tasks:
        return None
    try:
        from inference import eval_tasks
        from inference import lm_eval_adapter as adapter
    except ImportError as e:
        raise CommandError(f"train.eval_tasks needs lm-evaluation-harness ({e}); pip install -e '.[eval]'") from None
    include = train.eval_include_path
    if include and not os.path.isabs(include):
        include = os.path.join(os.path.dirname(run.path), include)
    try:
        manager, _ = eval_tasks.check_tasks(list(train.eval_tasks), include)
    except eval_tasks.EvalError as e:
        raise CommandError(f"train.eval_tasks: {e}") from None
    tokenizer = []

    def hook(model, step):
        if not tokenizer:
            tok_dir = run.data.tokenizer_dir
            candidates = [run.init_from, tok_dir if os.path.isabs(tok_dir) else os.path.join(args.workdir, tok_dir)]
            found = next((c for c in candidates if c and os.path.isfile(os.path.join(c, "tokenizer.json"))), None)
            tokenizer.append(adapter.load_tokenizer(found or candidates[-1], None))
        lm = adapter.NorMistralLM(model=model, tokenizer=tokenizer[0], batch_size=train.global_batch_size,
                                  progress=False)
        results = eval_tasks.evaluate(lm, list(train.eval_tasks), num_fewshot=train.eval_num_fewshot,
                                   limit=train.eval_limit, task_manager=manager, bootstrap_iters=0)
        return eval_tasks.scores(results) if results else {}

    return hook


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
        what, status = _interruption()
        _fail(f"{what}; rerun the same command to resume ({args.output})", status=status)
    for source in index["sources"]:
        start, stop = source["rows"]
        trained = f" ({source['trained_tokens']} trained)" if "trained_tokens" in source else ""
        print(f"  {source['name']}: {source['documents']} {'records' if trained else 'documents'}, "
              f"{source['tokens']} tokens{trained}, {stop - start} rows, weight {source['weight']:.3g}")
    print(f"prepare-data: {index['num_rows']} rows of {index['seq_len']} tokens -> {args.output}")


def _mesh_arg(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise CommandError(f"--mesh {text!r}: expected DATA,FSDP,TENSOR sizes, e.g. 1,-1,1")
    return sizes


def _check_lora(args, config) -> str | None:
    """--lora's adapter (a hub id fetched) checked against the model's config, before the weights load."""
    if args.lora is None:
        return None
    from jaxmodel.convert import resolve_lora
    from jaxmodel.lora import LoraError, error_line

    try:
        return resolve_lora(args.lora, config)
    except LoraError as e:
        raise CommandError(error_line(e, "--lora ", args.lora)) from None


def _generate(args):
    _join(args)
    import jax
    from tqdm.auto import tqdm

    from inference.generator import Generator, load_tokenizer, read_jsonl
    from jaxmodel import storage
    from jaxmodel.checks import check_new_output, check_template
    from jaxmodel.config import MistralConfig
    from jaxmodel.convert import config_source
    from jaxmodel.hub import resolve_model
    from jaxmodel.storage import atomic_file

    # Every argument is checked before the model loads (seconds to minutes for the 11B one).
    template = args.template.replace("\\n", "\n") if args.template is not None else None  # typed \n: newline
    if template is not None:
        check_template(template, "--template")
    model_dir = resolve_model(args.model_dir)  # a hub id -> its snapshot in the local cache
    storage.check_input_dir(model_dir, "model directory")
    config = MistralConfig.from_hf(config_source(model_dir))
    context = config.max_position_embeddings
    lora = _check_lora(args, config)
    if args.max_model_len is not None and not 2 <= args.max_model_len <= context:
        raise CommandError(f"--max-model-len {args.max_model_len}: must be in [2, {context}] (the model's context)")
    if args.output and jax.process_index() == 0:
        check_new_output(args.output, "--output", overwrite=args.overwrite, inputs={"--input": args.input})
        storage.check_output_file(args.output)
    records = read_jsonl(args.input) if args.input else [{"text": t} for t in args.prompt or []]
    names = [f"{args.input}: prompt {i + 1}" if args.input else f"--prompt {i + 1}" for i in range(len(records))]
    for name, record in zip(names, records):
        if not record["text"]:  # the tokenizer's <s> alone would be "generated from": refuse, as the README says
            raise CommandError(f"{name} is empty")
    mesh = None
    if args.mesh or jax.process_count() > 1:  # several processes: one mesh over all their devices
        from jaxmodel.sharding import make_mesh

        # Default: tensor-parallel within a host (fast links), data-parallel across hosts, so no weight
        # is all-gathered across hosts per token (an FSDP mesh would).
        mesh = make_mesh(_mesh_arg(args.mesh) if args.mesh else (jax.process_count(), 1, jax.local_device_count()))
    from inference.serve_door import check_memory

    pool = check_memory(config, max_num_seqs=args.batch_size, max_model_len=args.max_model_len or context,
                        page_size=args.page_size, kv_cache_memory=args.kv_cache_memory, dtype=args.dtype,
                        kv_cache_dtype=args.kv_cache_dtype, quantize=args.quantize, seqs_flag="--batch-size",
                        devices=list(mesh.devices.flat) if mesh is not None else jax.devices()[:1])
    _compile_cache(args)
    tokenizer = load_tokenizer(resolve_model(args.tokenizer)) if args.tokenizer else None
    gen = Generator.from_pretrained(model_dir, tokenizer=tokenizer, dtype=args.dtype, quantize=args.quantize,
                                    group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype, mesh=mesh,
                                    lora=lora, slots=args.batch_size, max_model_len=args.max_model_len,
                                    prefill_chunk=args.prefill_chunk,
                                    num_pages=pool.num_pages, page_size=args.page_size,
                                    prefix_caching=not args.no_prefix_caching, warmup=False)
    batches = gen.iter_records(
        records, max_new_tokens=args.max_new_tokens, stop="\n" if args.stop_at_newline else None,
        template=template,
        batch_size=args.batch_size, names=names, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    gen.warmup()  # after the prompts' checks: every program compiled now (a progress line), none while generating
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


def _eval(args):
    """`normistral eval`: lm-eval tasks on the JAX model (inference/lm_eval_adapter.py). Cheap checks first
    (model directory or hub id, output path, the model's config and --max-length, task names and their data,
    the few-shot count and the generation room against the tasks), then the model load (the tokenizer checked
    against the vocabulary first), then the harness. Every process runs the harness and computes (collectives
    over the global mesh); process 0 prints lm-eval's table and writes the JSON."""
    _join(args)
    import jax

    from jaxmodel import storage
    from jaxmodel.checks import check_new_output
    from jaxmodel.config import MistralConfig
    from jaxmodel.convert import config_source
    from jaxmodel.hub import check_revision, is_hub_id, resolve_model

    try:
        from inference import eval_tasks
        from inference import lm_eval_adapter as adapter
    except ImportError as e:
        raise CommandError(f"eval needs lm-evaluation-harness ({e}); pip install -e '.[eval]'") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    check_revision(args.model)
    if not is_hub_id(args.model) and not storage.isdir(args.model):  # a hub id is looked up below
        raise CommandError(f"{args.model}: model directory not found")
    if args.output:
        check_new_output(args.output, "--output", overwrite=args.overwrite)
        storage.check_output_file(args.output)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise CommandError(f"--num-fewshot {args.num_fewshot}: expected 0 or more")
    # A hub id: its config.json only for now (the weights come with the model load, after the task checks).
    config = MistralConfig.from_hf(config_source(resolve_model(args.model, config_only=True)))
    context = config.max_position_embeddings
    lora = _check_lora(args, config)
    if args.max_length is not None and args.max_length > context:
        raise CommandError(f"--max-length {args.max_length}: more than the model's context ({context} tokens)")
    try:
        manager, loaded = eval_tasks.check_tasks(tasks, args.include_path)
        eval_tasks.check_task_settings(loaded, num_fewshot=args.num_fewshot, max_length=args.max_length or context,
                                    cli=True)
        _compile_cache(args)
        lm = adapter.NorMistralLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, quantize=args.quantize,
                                  group_size=args.group_size if args.quantize == "int4" else None, lora=lora,
                                  batch_size=args.batch_size, max_length=args.max_length, cli=True,
                                  mesh=_mesh_arg(args.mesh) if args.mesh else ("1x-1x1" if jax.process_count() > 1
                                                                              else None))
        results = eval_tasks.evaluate(lm, tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=manager,
                                   log_samples=args.log_samples)
    except eval_tasks.EvalError as e:
        raise CommandError(str(e)) from None
    if jax.process_index() != 0 or results is None:
        return
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        with storage.atomic_file(args.output) as f:
            json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        print(f"eval: results -> {args.output}")


def _serve(args):
    """`normistral serve`: the engine behind an OpenAI-compatible HTTP API (inference/server.py, behind the
    door of inference/serve_door.py). Every flag, the socket and the memory the cache needs are checked
    before the weights load."""
    import signal
    import threading

    from jaxmodel.checks import is_utf8
    from jaxmodel.config import MistralConfig
    from jaxmodel.hub import resolve_model
    from jaxmodel.storage import check_input_dir

    if threading.current_thread() is threading.main_thread():  # SIGTERM while loading or compiling: as Ctrl-C
        signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)  # (while serving, uvicorn's handler drains instead)
    requested, args.model_dir = args.model_dir, resolve_model(args.model_dir)  # a hub id -> its cached snapshot
    check_input_dir(args.model_dir, "model directory")
    for flag, value, low in (("--max-model-len", args.max_model_len, 2),
                             ("--port", args.port, 0), ("--max-queue", args.max_queue, 1),
                             ("--prefill-chunk", args.prefill_chunk, 16)):
        if value is not None and value < low:
            raise CommandError(f"{flag} {value}: must be >= {low}")
    if args.port > 65535:
        raise CommandError(f"--port {args.port}: must be <= 65535")
    name = args.served_model_name
    if name is not None and (not name.strip() or not name.isprintable() or not is_utf8(name)):
        raise CommandError(f"--served-model-name {name!r}: must be printable text, not empty")
    from jaxmodel import storage
    from jaxmodel.convert import config_source

    config = MistralConfig.from_hf(config_source(args.model_dir))  # before the weights
    context = config.max_position_embeddings
    lora = _check_lora(args, config)
    if args.max_model_len is not None and args.max_model_len > context:
        raise CommandError(f"--max-model-len {args.max_model_len}: more than the model's context ({context})")
    max_len = args.max_model_len or context
    import jax

    from inference import serve_door, server
    from inference.engine import Engine
    from inference.generator import Generator

    mesh = None
    if args.mesh:
        from jaxmodel.sharding import make_mesh

        mesh = make_mesh(_mesh_arg(args.mesh))
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    pool = serve_door.check_memory(config, max_num_seqs=args.max_num_seqs, max_model_len=max_len,
                                   page_size=args.page_size, kv_cache_memory=args.kv_cache_memory, dtype=args.dtype,
                                   kv_cache_dtype=args.kv_cache_dtype, quantize=args.quantize, devices=devices)
    _compile_cache(args)
    sock = serve_door.bind_socket(args.host, args.port)  # held from here: a bad address fails before the load
    gen = Generator.from_pretrained(args.model_dir, dtype=args.dtype, quantize=args.quantize,
                                    group_size=args.group_size, mesh=mesh, lora=lora,
                                    kv_cache_dtype=args.kv_cache_dtype, progress=True,
                                    warmup=False)  # the weights and tokenizer only: serve builds its own engine
    door = serve_door.Door(serve_door.Limits(request_timeout=args.request_timeout,
                                             max_connections=args.max_connections,
                                             shutdown_grace=args.shutdown_grace))
    engine = Engine(gen.parts, max_num_seqs=args.max_num_seqs, max_model_len=max_len,
                    kv_cache_dtype=args.kv_cache_dtype, page_size=args.page_size, num_pages=pool.num_pages,
                    prefix_caching=not args.no_prefix_caching, prefill_chunk=args.prefill_chunk,
                    max_queue=args.max_queue, decode=gen.decode, on_fatal=door.fail)
    _serve_faults(engine)
    name = name or storage.basename(requested)
    if not args.no_warmup:
        from jaxmodel.compile_cache import CompileCount

        t, count = time.time(), CompileCount()
        print("normistral serve: compiling the engine's programs ...", file=sys.stderr, flush=True)
        programs = engine.warmup()
        print(f"normistral serve: {programs} programs ready in {time.time() - t:.1f} s ({count.summary()})",
              file=sys.stderr, flush=True)
    app = server.create_app(engine, gen.tokenizer, name, door)
    engine.start()
    print(f"normistral serve: {name} on {serve_door.url_of(sock)}/v1 (up to {engine.slots} sequences of up to "
          f"{max_len} tokens; KV cache {engine.num_pages} pages of {engine.page_size} tokens, "
          f"{engine.cache_bytes / 2**20:.1f} MiB; {jax.devices()[0].platform})", file=sys.stderr, flush=True)
    try:
        failure = serve_door.run(app, sock)
    finally:
        engine.stop()
    if failure is not None:  # exit non-zero so that a supervisor restarts the server
        _fail(f"the engine stopped ({type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''})"
              "; the server exited so that it can be restarted", status=1)


def _sigterm_as_ctrl_c(signum, frame):
    global _terminated
    _terminated = True  # main() reports "terminated (SIGTERM)", exit status 143 (see _ctrl_c_handler)
    raise KeyboardInterrupt


def _serve_faults(engine) -> None:
    """Test-only: NORMISTRAL_FAULTS="engine_fails_at_step=N" makes the engine's N-th step raise, as a
    device error would (tests/inference/test_server_hostile.py checks the server then exits 1)."""
    if "NORMISTRAL_FAULTS" not in os.environ:  # a real server: not even the import (it loads Orbax)
        return
    from training.checkpoint import fault

    at = fault("engine_fails_at_step")
    if at is None:
        return
    step, count = engine.step, [0]

    def failing_step():
        count[0] += 1
        if count[0] >= at:
            raise RuntimeError("injected fault: engine_fails_at_step")
        step()

    engine.step = failing_step


def _demo(args):
    if args.steps < 2:  # checked before anything is built
        raise CommandError(f"argument --steps: the demo needs at least 2 training steps (it stops halfway and "
                           f"resumes), got {args.steps}")
    from normistral_demo import run_demo

    run_demo(args.workdir, steps=args.steps)


# Weight quantization choices for every command that loads a model for inference (generate, serve). The
# same list as inference.quantize.MODES, spelled here because the parser must not import JAX (JAX reads
# JAX_PLATFORMS when imported, and _default_platform sets it after parsing); a test checks they agree.
QUANTIZE_CHOICES = ("int8", "int4")
MODEL_HELP = "a Hugging Face (or import-hf) directory with its tokenizer, or a hub model id org/name[@revision]"


DEFAULT_GROUP_SIZE = 128  # inference.quantize.DEFAULT_GROUP_SIZE (not imported here: see above)


def add_quantize_flags(p) -> None:
    """--quantize and --group-size (generate, serve and eval); _check_group_size pairs them after parsing.
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


def _memory(text: str) -> int | float:
    """--kv-cache-memory: bytes (4GiB, 512MiB, 123456) or a fraction in (0, 1] of free device memory (0.9)."""
    from jaxmodel.checks import memory_amount  # no JAX import: the parser runs before JAX_PLATFORMS is settled

    try:
        return memory_amount(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_pool_flags(p, *, seqs: bool = True) -> None:
    """The engine's KV cache pool (serve; generate without --max-num-seqs, its --batch-size is that) and
    the persistent compilation cache."""
    if seqs:
        p.add_argument("--max-num-seqs", "--slots", dest="max_num_seqs", type=positive_int, default=8, metavar="N",
                       help="sequences decoded together at most (default 8; --slots is the old name)")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="the longest sequence, prompt + completion, in tokens (default: the model's context)")
    p.add_argument("--kv-cache-memory", type=_memory, metavar="BYTES|FRACTION",
                   help="the KV cache's pool of pages: bytes (4GiB, 512MiB, 123456) or a fraction of the device "
                        "memory free after the weights (0.9); default: pages for N sequences of --max-model-len "
                        "tokens, at most 0.9 of the free memory")
    p.add_argument("--page-size", type=positive_int, default=16, metavar="TOKENS", help="tokens per KV cache page")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the cached pages of earlier prompts' common prefixes")
    add_compile_cache_flag(p)


def add_compile_cache_flag(p) -> None:
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache ($XDG_CACHE_HOME/normistral/jax or "
                        "~/.cache/normistral/jax; NORMISTRAL_COMPILE_CACHE=0 turns it off too)")


def _compile_cache(args) -> None:
    """JAX's persistent compilation cache (jaxmodel/compile_cache.py), on unless --no-compile-cache or
    NORMISTRAL_COMPILE_CACHE=0; set before anything compiles."""
    from jaxmodel import compile_cache

    try:
        compile_cache.enable(not args.no_compile_cache)
    except compile_cache.CompileCacheError as e:
        raise CommandError(str(e)) from None


def _check_group_size(parser, args) -> None:
    """--group-size means something only for int4: refused otherwise (it would be ignored); then the default."""
    if args.group_size is not None and args.quantize != "int4":
        parser.error("--group-size needs --quantize int4")
    if args.group_size is None:
        args.group_size = DEFAULT_GROUP_SIZE


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="normistral", description=__doc__.splitlines()[0])
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

    p = sub.add_parser("compile-check", help="compile a step ahead of time for a TPU topology; report memory")
    p.add_argument("--config", required=True, help="a run config YAML, or a bundled config's name")
    p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:2x2, v6e:1x1")
    p.add_argument("--mode", choices=["train", "prefill", "decode"], default="prefill",
                   help="what to compile: prefill (the default: one forward over the inference section's batch "
                        "and length, else the training shapes), decode (the whole generation program, its decode "
                        "step and the serving engine's steps) or train (one training step)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    for flag, key in (("--max-model-len", "max_model_len"), ("--max-num-seqs", "max_num_seqs"),
                      ("--kv-cache-memory", "kv_cache_memory"), ("--page-size", "page_size")):
        p.add_argument(flag, metavar="VALUE", help=f"--mode decode: the engine's inference.{key} (as --set)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--workdir", help="--mode train: the run's --workdir, so its data is checked as train checks it")
    p.add_argument("--check-data", action="store_true",
                   help="--mode train: also read remote (gs://) data, and fail if the data is missing (default: "
                        "local data that exists is checked, the rest reported as not checked)")
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

    p = sub.add_parser("generate", help="greedy (or sampled) generation from a model directory; JSON lines out")
    p.add_argument("model_dir", help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT", help="one or more prompts")
    src.add_argument("--input", metavar="FILE.jsonl", help='one prompt per line: {"text": ...} (other fields kept)')
    p.add_argument("--template", help='format string for each prompt, e.g. "Engelsk: {0}\\nBokmål:" (\\n: newline)')
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="sequences decoded together at most, and prompts per printed group")
    p.add_argument("--prefill-chunk", type=positive_int, default=256, help="prompt tokens per step, at most")
    p.add_argument("--stop-at-newline", action="store_true",
                   help="stop a row at any token containing a newline (the model card's stop set)")
    p.add_argument("--output", metavar="FILE.jsonl", help="also write the results here (one JSON object per line); "
                   "never the --input file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file (when complete)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    add_quantize_flags(p)
    p.add_argument("--kv-cache-dtype", choices=["int8"], help="int8 KV cache (default: the compute dtype)")
    add_pool_flags(p, seqs=False)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-k", type=_ranged(int, lambda v: 0 <= v < 2**31, "be an integer in [0, 2^31)"), default=0,
                   help="0: off; above the vocabulary size it is off too")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a Hugging Face tokenizer directory or hub id (default: MODEL_DIR's)")
    p.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                   help="shard the model over a mesh (default: one device; several processes: P,1,local devices)")
    _add_distributed_flags(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks (NorEval, ...) on the JAX model; lm-eval's table")
    p.add_argument("model", help="a Hugging Face or import-hf directory, or WORKDIR/checkpoints/STEP")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="lm-eval task, tag or group names, comma-separated")
    p.add_argument("--num-fewshot", type=integer, metavar="K", help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=_limit, metavar="N",
                   help="at most N documents per task (an integer), or a fraction of each task's documents (below 1)")
    p.add_argument("--output", metavar="results.json", help="write lm-eval's results JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file (when complete)")
    p.add_argument("--include-path", metavar="DIR", help="a directory of extra task YAMLs")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in the JSON")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="packed rows per scoring call; prompts per generate")
    p.add_argument("--max-length", type=positive_int, help="context window in tokens (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    add_quantize_flags(p)
    p.add_argument("--tokenizer", metavar="DIR", help="default: MODEL's own, or for a checkpoint step its run's")
    p.add_argument("--mesh", metavar="DATA,FSDP,TENSOR",
                   help="shard the model over a device mesh (default: one device; 1,-1,1 with several processes)")
    add_compile_cache_flag(p)
    _add_distributed_flags(p)
    p.set_defaults(func=_eval)
    p = sub.add_parser("serve", help="an OpenAI-compatible completions server (continuous batching engine)")
    p.add_argument("model_dir", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    add_quantize_flags(p)
    p.add_argument("--kv-cache-dtype", choices=["int8"], help="int8 KV cache (default: the compute dtype)")
    add_pool_flags(p)
    p.add_argument("--mesh", metavar="DATA,FSDP,TENSOR", help="device mesh (default: one device)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which the server answers 429")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill call and row")
    p.add_argument("--served-model-name", help="the model id clients send (default: MODEL_DIR's name)")
    p.add_argument("--no-warmup", action="store_true", help="compile the engine's programs on first use, not at start")
    p.add_argument("--max-connections", type=positive_int, default=512,
                   help="open connections beyond which a new one is answered 503 and closed (default 512)")
    p.add_argument("--request-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                   help="a request's headers, and then its body, must arrive within this (default 30; "
                        "headers late: closed, body late: 408)")
    p.add_argument("--shutdown-grace", type=non_negative_float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, running requests get this long to finish (default 10); queued "
                        "ones get 503 at once")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="the end-to-end run on a tiny local checkpoint (the Quickstart's main job)")
    p.add_argument("--workdir", default="demo-run", help="created (or a previous demo's, replaced)")
    p.add_argument("--steps", type=positive_int, default=300,
                   help="training steps, at least 2 (the run stops halfway and resumes)")
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
    if argv is None:  # the program itself, not a call from Python (tests, notebooks)
        _ctrl_c_handler()
        sys.stderr = _LineTracking(sys.stderr)
    try:
        _dispatch(args)
    except KeyboardInterrupt:
        what, status = _interruption()
        try:
            _fail(f"{what}; outputs being written were removed, finished ones kept", status=status)
        except SystemExit:
            if argv is None:  # the program itself (not a call from Python): end now. A computation or compile
                # still running in native threads can crash the interpreter's shutdown (a segfault, exit -11).
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
            raise


_terminated = False  # set by the SIGTERM handler: the KeyboardInterrupt that follows came from SIGTERM


def _interruption() -> tuple[str, int]:
    """What stopped the run, for the error line, and the exit status (128 + the signal's number)."""
    return ("terminated (SIGTERM)", 143) if _terminated else ("interrupted (Ctrl-C)", 130)


def _ctrl_c_handler() -> None:
    """Ctrl-C raises KeyboardInterrupt as usual, except inside a garbage-collector callback (JAX installs
    one), where the interpreter would print and swallow it and the run would go on; there it is raised
    again a moment later, outside the callback (seen: a train interrupted while compiling kept training).
    SIGTERM (`kill`, a scheduler, `docker stop`) takes the same path, with its own line and status 143;
    `train` (preemption: save and exit 0) and uvicorn (`serve`) install their own while they run."""
    import _thread
    import gc
    import signal
    import threading

    def interrupt(signum, frame):
        callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
        while frame is not None:
            if frame.f_code in callbacks:
                threading.Timer(0.05, _thread.interrupt_main, args=(signum,)).start()
                return
            frame = frame.f_back
        raise KeyboardInterrupt

    def terminate(signum, frame):
        global _terminated
        _terminated = True
        # Whatever handles Ctrl-C now handles this too: code that must not be interrupted mid-write
        # defers Ctrl-C with its own SIGINT handler (jaxmodel/orbax_stream.py), and so defers SIGTERM.
        on_ctrl_c = signal.getsignal(signal.SIGINT)
        if callable(on_ctrl_c):
            on_ctrl_c(signal.SIGINT, frame)
        else:  # Ctrl-C ignored (a background job of a script): SIGTERM still stops the run
            interrupt(signum, frame)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # not one ignored by whoever started us
        signal.signal(signal.SIGTERM, terminate)


def _dispatch(args) -> None:
    """Runs the subcommand; a user's mistake becomes one line `normistral: error: ...` and exit status 2."""
    from inference.generate import GenerateError
    from jaxmodel.aot import TopologyError
    from jaxmodel.checks import TemplateError
    from jaxmodel.config import ConfigError
    from jaxmodel.convert import ConvertError
    from jaxmodel.distributed import DistributedError
    from jaxmodel.safetensors_io import WeightFileError
    from jaxmodel.sharding import ShardingError
    from jaxmodel.storage import StorageError

    user_errors = (ConfigError, ConvertError, ShardingError, TopologyError, CommandError, GenerateError,
                   DistributedError, StorageError, TemplateError, WeightFileError)
    try:
        args.func(args)
    except user_errors as e:
        _fail(str(e))
    except OSError as e:
        if e.filename is None and isinstance(e, (FileNotFoundError, NotADirectoryError, FileExistsError)):
            _fail(str(e))  # raised with a message of ours ("PATH: no such file")
        if e.filename is None:
            raise  # not about a path the user gave: a bug, keep the traceback
        _fail(_os_error_line(e))


def _os_error_line(e: OSError) -> str:
    """`PATH: reason` for an OSError about a user's path, naming the user's path rather than a temporary
    sibling (`.NAME.tmp-PID-XXXX` -> NAME)."""
    import re

    path = re.sub(r"(^|/)\.([^/]+)\.tmp-\d+-[^/]+", r"\1\2", os.fsdecode(e.filename))
    return f"{path}: {(e.strerror or str(e)).lower()}"


def _close_progress_bars() -> None:
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


class _LineTracking:
    """sys.stderr, remembering whether its last write ended a line. A signal can land inside a progress
    bar's close(), between its last redraw (ending in a carriage return) and its newline: that bar is no
    longer open for `_close_progress_bars`, and the error line must still start a line of its own."""

    def __init__(self, stream):
        self._stream = stream
        self.mid_line = False

    def write(self, text):
        if text:
            self.mid_line = not text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _fail(message: str, status: int = 2):
    _close_progress_bars()
    sys.stdout.flush()
    start = "\n" if getattr(sys.stderr, "mid_line", False) else ""
    print(f"{start}normistral: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status) from None


if __name__ == "__main__":
    main()
