"""The commands that drive inference/: generate and eval (serve is inference/serve_cli.py), compile-check's
prefill and decode modes (`compile_prefill_mode`, `compile_decode_mode`, `print_engine`), and the trainer's
evaluation hook (`train_eval_hook`, handed to training/cli.py by normistral.py).

`add_commands(subparsers)` registers generate, eval and serve. `generate --config C` and `serve --config C`
read C's `inference:` section (inference/config.py) and its `mesh:`; a flag given explicitly overrides it.
Heavy imports (JAX, transformers) stay inside the handlers: `--help` and a bad flag answer at once.
"""

from __future__ import annotations

import json
import os
import sys

from inference.config import add_config_flag, config_mesh, read_config
from inference.serve_cli import add_serve
from jaxmodel.cli import (
    DTYPES,
    MODEL_HELP,
    CommandError,
    add_compile_cache_flag,
    add_distributed_flags,
    add_mesh_flag,
    add_pool_flags,
    add_quantize_flags,
    check_lora,
    compile_cache,
    integer,
    join,
    limit,
    mesh_arg,
    positive_float,
    positive_int,
    ranged,
    unit_interval,
)

# generate's flags for the `inference:` fields they override (its --batch-size is the engine's max_num_seqs).
GENERATE_FLAGS = {"max_num_seqs": "--batch-size", "max_new_tokens": "--max-new-tokens",
                  "prefill_chunk": "--prefill-chunk", "quantize": "--quantize", "group_size": "--group-size",
                  "kv_cache_dtype": "--kv-cache-dtype", "max_model_len": "--max-model-len",
                  "kv_cache_memory": "--kv-cache-memory", "page_size": "--page-size",
                  "prefix_caching": "--no-prefix-caching"}


def _generate(args):
    join(args)
    tree, cfg = read_config(args, GENERATE_FLAGS)  # before JAX: a bad section is one line, at once
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
    lora = check_lora(args, config)
    from inference.config import LOWEST, culprit

    if cfg.prefill_chunk < dict(LOWEST)["prefill_chunk"]:  # serve's rule too
        raise CommandError(f"{culprit(args, 'prefill_chunk', '--prefill-chunk', tree)}: must be >= "
                           f"{dict(LOWEST)['prefill_chunk']}")
    if cfg.max_model_len is not None and not 2 <= cfg.max_model_len <= context:
        raise CommandError(f"{culprit(args, 'max_model_len', '--max-model-len', tree)}: must be in [2, {context}] "
                           "(the model's context)")
    if args.output and jax.process_index() == 0:
        check_new_output(args.output, "--output", overwrite=args.overwrite, inputs={"--input": args.input})
        storage.check_output_file(args.output)
    records = read_jsonl(args.input) if args.input else [{"text": t} for t in args.prompt or []]
    names = [f"{args.input}: prompt {i + 1}" if args.input else f"--prompt {i + 1}" for i in range(len(records))]
    for name, record in zip(names, records):
        if not record["text"]:  # the tokenizer's <s> alone would be "generated from": refuse, as the README says
            raise CommandError(f"{name} is empty")
    mesh = config_mesh(tree) if not args.mesh else None
    if args.mesh or (mesh is None and jax.process_count() > 1):  # several processes: one mesh over all devices
        from jaxmodel.sharding import make_mesh

        # Default: tensor-parallel within a host (fast links), data-parallel across hosts, so no weight
        # is all-gathered across hosts per token (an FSDP mesh would).
        mesh = make_mesh(mesh_arg(args.mesh) if args.mesh else (jax.process_count(), 1, jax.local_device_count()))
    from inference.serve_door import check_memory

    batch = cfg.seqs
    pool = check_memory(config, max_num_seqs=batch, max_model_len=cfg.max_model_len or context,
                        page_size=cfg.page_size, kv_cache_memory=cfg.kv_cache_memory, dtype=args.dtype,
                        kv_cache_dtype=cfg.kv_cache_dtype, quantize=cfg.quantize, seqs_flag="--batch-size",
                        devices=list(mesh.devices.flat) if mesh is not None else jax.devices()[:1])
    compile_cache(args)
    tokenizer = load_tokenizer(resolve_model(args.tokenizer)) if args.tokenizer else None
    gen = Generator.from_pretrained(model_dir, tokenizer=tokenizer, dtype=args.dtype, quantize=cfg.quantize,
                                    group_size=cfg.group_size, kv_cache_dtype=cfg.kv_cache_dtype, mesh=mesh,
                                    lora=lora, slots=batch, max_model_len=cfg.max_model_len,
                                    prefill_chunk=cfg.prefill_chunk, num_pages=pool.num_pages,
                                    page_size=cfg.page_size, prefix_caching=cfg.prefix_caching, warmup=False)
    batches = gen.iter_records(
        records, max_new_tokens=cfg.max_new_tokens, stop="\n" if args.stop_at_newline else None, template=template,
        batch_size=batch, names=names, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    gen.warmup()  # after the prompts' checks: every program compiled now (a progress line), none while generating
    primary = jax.process_index() == 0  # every process generates (collectives); process 0 reports
    with atomic_file(args.output if primary else None) as out, tqdm(
            total=len(records), unit="prompt", disable=not (args.input and primary), file=sys.stderr) as bar:
        for group in batches:  # printed per batch, in input order; the output file appears only when complete
            for record in group:
                line = json.dumps(record, ensure_ascii=False)
                if not primary:
                    continue
                if args.input:
                    bar.write(line, file=sys.stdout)  # above the progress bar
                else:
                    print(line, flush=True)
                if out:
                    out.write(line + "\n")
            bar.update(len(group))


def _eval(args):
    """`normistral eval`: lm-eval tasks on the JAX model (inference/lm_eval_adapter.py). Cheap checks first
    (model directory or hub id, output path, the model's config and --max-length, task names and their data,
    the few-shot count and the generation room against the tasks), then the model load (the tokenizer checked
    against the vocabulary first), then the harness. Every process runs the harness and computes (collectives
    over the global mesh); process 0 prints lm-eval's table and writes the JSON."""
    join(args)
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
    lora = check_lora(args, config)
    if args.max_length is not None and args.max_length > context:
        raise CommandError(f"--max-length {args.max_length}: more than the model's context ({context} tokens)")
    try:
        manager, loaded = eval_tasks.check_tasks(tasks, args.include_path)
        eval_tasks.check_task_settings(loaded, num_fewshot=args.num_fewshot, max_length=args.max_length or context,
                                       cli=True)
        compile_cache(args)
        lm = adapter.NorMistralLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, quantize=args.quantize,
                                  group_size=args.group_size if args.quantize == "int4" else None, lora=lora,
                                  batch_size=args.batch_size, max_length=args.max_length, cli=True,
                                  mesh=mesh_arg(args.mesh) if args.mesh else ("1x-1x1" if jax.process_count() > 1
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


def train_eval_hook(run, workdir: str):
    """The `train.eval_tasks` hook for training/cli.py: lm-eval on the run's current weights. The tasks are
    checked here, before training starts; the tokenizer is found at the first evaluation (the run may build
    it): model.init_from's, else WORKDIR/<data.tokenizer_dir>. `run` is training.config's loaded run."""
    train = run.train
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
            candidates = [run.init_from, tok_dir if os.path.isabs(tok_dir) else os.path.join(workdir, tok_dir)]
            found = next((c for c in candidates if c and os.path.isfile(os.path.join(c, "tokenizer.json"))), None)
            tokenizer.append(adapter.load_tokenizer(found or candidates[-1], None))
        lm = adapter.NorMistralLM(model=model, tokenizer=tokenizer[0], batch_size=train.global_batch_size,
                                  progress=False)
        results = eval_tasks.evaluate(lm, list(train.eval_tasks), num_fewshot=train.eval_num_fewshot,
                                      limit=train.eval_limit, task_manager=manager, bootstrap_iters=0)
        return eval_tasks.scores(results) if results else {}

    return hook


# -- compile-check --mode prefill / decode ------------------------------------------------------------------------


def _workload(tree: dict, mode: str) -> tuple[int, int]:
    """(batch, length) of the step to compile: the inference section if present (its defaults fill what it
    leaves out), else the training shapes."""
    train = tree.get("train") or {}
    if tree.get("inference"):
        from inference.config import inference_config

        cfg = inference_config(tree)
        return cfg.batch_size, cfg.max_length
    batch, length = train.get("global_batch_size"), train.get("seq_len")
    if not (isinstance(batch, int) and isinstance(length, int) and batch > 0 and length > 0):
        from jaxmodel.run_config import where

        raise CommandError(f"{where(tree, 'train')}: --mode {mode} needs train.global_batch_size and "
                           "train.seq_len (or an inference section)")
    return batch, length


def compile_prefill_mode(tree: dict, args) -> tuple[dict, int, int]:
    from jaxmodel import aot, run_config

    config, mesh = run_config.model_config(tree), run_config.mesh_shape(tree)
    batch, length = _workload(tree, "prefill")
    if (tree.get("inference") or {}).get("quantize"):
        raise CommandError("--mode prefill compiles the unquantized forward; for an inference config with "
                           "quantize use --mode decode (the whole generation program, prefill included)")
    return aot.compile_prefill(config, mesh, args.topology, batch_size=batch, seq_len=length), batch, length


def compile_decode_mode(tree: dict, args) -> tuple[dict, int, int]:
    from jaxmodel import run_config

    run_config.model_config(tree), run_config.mesh_shape(tree)  # their errors first, as every mode
    batch, length = _workload(tree, "decode")
    from inference.aot import compile_decode  # it reads the inference section itself

    return compile_decode(tree, args.topology), batch, length


def _gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1024**3:.3f} GiB"  # None: a program that was not compiled


def print_engine(report: dict) -> None:
    """compile-check's lines for --mode decode's engine (normistral serve, Generator); nothing otherwise."""
    eng = report.get("engine")
    if eng is None:
        return
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


# -- the parsers --------------------------------------------------------------------------------------------------


def add_commands(sub) -> None:
    """Registers generate, eval and serve."""
    p = sub.add_parser("generate", help="greedy (or sampled) generation from a model directory; JSON lines out")
    p.add_argument("model_dir", help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", nargs="+", action="extend", metavar="TEXT", help="one or more prompts")
    src.add_argument("--input", metavar="FILE.jsonl", help='one prompt per line: {"text": ...} (other fields kept)')
    add_config_flag(p, "generate")
    p.add_argument("--template", help='format string for each prompt, e.g. "Engelsk: {0}\\nBokmål:" (\\n: newline)')
    p.add_argument("--max-new-tokens", type=positive_int, help="default 64")
    p.add_argument("--batch-size", type=positive_int,
                   help="sequences decoded together at most, and prompts per printed group (default 8)")
    p.add_argument("--prefill-chunk", type=positive_int, help="prompt tokens per step, at most (default 256)")
    p.add_argument("--stop-at-newline", action="store_true",
                   help="stop a row at any token containing a newline (the model card's stop set)")
    p.add_argument("--output", metavar="FILE.jsonl", help="also write the results here (one JSON object per line); "
                   "never the --input file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file (when complete)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    add_quantize_flags(p)
    p.add_argument("--kv-cache-dtype", choices=["int8"], help="int8 KV cache (default: the compute dtype)")
    add_pool_flags(p, seqs=False)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-k", type=ranged(int, lambda v: 0 <= v < 2**31, "be an integer in [0, 2^31)"), default=0,
                   help="0: off; above the vocabulary size it is off too")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a Hugging Face tokenizer directory or hub id (default: MODEL_DIR's)")
    add_mesh_flag(p, "shard the model over a mesh (default: --config's mesh, else one device; several processes: "
                     "P,1,local devices)")
    add_distributed_flags(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks (NorEval, ...) on the JAX model; lm-eval's table")
    p.add_argument("model", help="a Hugging Face or import-hf directory, or WORKDIR/checkpoints/STEP")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="lm-eval task, tag or group names, comma-separated")
    p.add_argument("--num-fewshot", type=integer, metavar="K", help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=limit, metavar="N",
                   help="at most N documents per task (an integer), or a fraction of each task's documents (below 1)")
    p.add_argument("--output", metavar="results.json", help="write lm-eval's results JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file (when complete)")
    p.add_argument("--include-path", metavar="DIR", help="a directory of extra task YAMLs")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in the JSON")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="packed rows per scoring call; prompts per generate")
    p.add_argument("--max-length", type=positive_int, help="context window in tokens (default: the model's)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    add_quantize_flags(p)
    p.add_argument("--tokenizer", metavar="DIR", help="default: MODEL's own, or for a checkpoint step its run's")
    add_mesh_flag(p, "shard the model over a device mesh (default: one device; 1,-1,1 with several processes)")
    add_compile_cache_flag(p)
    add_distributed_flags(p)
    p.set_defaults(func=_eval)

    add_serve(sub)
