"""`normistral serve`: the engine behind an OpenAI-compatible HTTP API (inference/server.py, behind the door of
inference/serve_door.py). `add_serve(subparsers)` registers it.

`serve --config C` takes the engine's settings from C's `inference:` section (inference/config.py: max_num_seqs,
max_model_len, prefill_chunk, kv_cache_dtype, quantize, group_size, max_queue, kv_cache_memory, page_size,
prefix_caching) and the mesh from its `mesh:` section; a flag given explicitly wins. Without --config the
flags and their defaults are what they always were. Every flag, the socket and the memory the cache needs are
checked before the weights load.
"""

from __future__ import annotations

import os
import sys
import time

from jaxmodel.cli import (
    DTYPES,
    MODEL_HELP,
    CommandError,
    add_mesh_flag,
    add_pool_flags,
    add_quantize_flags,
    check_lora,
    compile_cache,
    fail,
    mesh_arg,
    non_negative_float,
    positive_float,
    positive_int,
    sigterm_as_ctrl_c,
)

# serve's flags for the `inference:` fields they override.
SERVE_FLAGS = {"max_num_seqs": "--max-num-seqs", "max_model_len": "--max-model-len", "prefill_chunk": "--prefill-chunk",
               "kv_cache_dtype": "--kv-cache-dtype", "quantize": "--quantize", "group_size": "--group-size",
               "max_queue": "--max-queue", "kv_cache_memory": "--kv-cache-memory", "page_size": "--page-size",
               "prefix_caching": "--no-prefix-caching"}


def _check_flags(args, tree, cfg) -> None:
    """serve's own ranges, each error naming the flag (or the config line) the value came from."""
    from inference.config import LOWEST, culprit
    from jaxmodel.checks import is_utf8

    for field, low in LOWEST:
        value = getattr(cfg, field)
        if value is not None and value < low:
            raise CommandError(f"{culprit(args, field, SERVE_FLAGS[field], tree)}: must be >= {low}")
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port}: must be {'>= 0' if args.port < 0 else '<= 65535'}")
    name = args.served_model_name
    if name is not None and (not name.strip() or not name.isprintable() or not is_utf8(name)):
        raise CommandError(f"--served-model-name {name!r}: must be printable text, not empty")


def _early_flags(args) -> None:
    """The flags whose values no config can make valid, checked before the config is read (as before --config)."""
    from inference.config import LOWEST

    lowest = [(SERVE_FLAGS[field], getattr(args, field), low) for field, low in LOWEST]
    for flag, value, low in lowest[:1] + [("--port", args.port, 0)] + lowest[1:]:  # the order they are checked in
        if value is not None and value < low:
            raise CommandError(f"{flag} {value}: must be >= {low}")


def _serve(args):
    import signal
    import threading

    from jaxmodel.config import MistralConfig
    from jaxmodel.hub import resolve_model
    from jaxmodel.storage import check_input_dir

    if threading.current_thread() is threading.main_thread():  # SIGTERM while loading or compiling: as Ctrl-C
        signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)  # (while serving, uvicorn's handler drains instead)
    requested, args.model_dir = args.model_dir, resolve_model(args.model_dir)  # a hub id -> its cached snapshot
    check_input_dir(args.model_dir, "model directory")
    _early_flags(args)
    from inference.config import config_mesh, read_config

    tree, cfg = read_config(args, SERVE_FLAGS)
    _check_flags(args, tree, cfg)
    from jaxmodel import storage
    from jaxmodel.convert import config_source

    config = MistralConfig.from_hf(config_source(args.model_dir))  # before the weights
    context = config.max_position_embeddings
    lora = check_lora(args, config)
    if cfg.max_model_len is not None and cfg.max_model_len > context:
        from inference.config import culprit

        raise CommandError(f"{culprit(args, 'max_model_len', '--max-model-len', tree)}: more than the model's "
                           f"context ({context})")
    max_len = cfg.max_model_len or context
    import jax

    from inference import serve_door, server
    from inference.engine import Engine
    from inference.generator import Generator

    if args.mesh:
        from jaxmodel.sharding import make_mesh

        mesh = make_mesh(mesh_arg(args.mesh))
    else:
        mesh = config_mesh(tree)
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]
    pool = serve_door.check_memory(config, max_num_seqs=cfg.seqs, max_model_len=max_len, page_size=cfg.page_size,
                                   kv_cache_memory=cfg.kv_cache_memory, dtype=args.dtype,
                                   kv_cache_dtype=cfg.kv_cache_dtype, quantize=cfg.quantize, devices=devices)
    compile_cache(args)
    sock = serve_door.bind_socket(args.host, args.port)  # held from here: a bad address fails before the load
    gen = Generator.from_pretrained(args.model_dir, dtype=args.dtype, quantize=cfg.quantize,
                                    group_size=cfg.group_size, mesh=mesh, lora=lora,
                                    kv_cache_dtype=cfg.kv_cache_dtype, progress=True,
                                    warmup=False)  # the weights and tokenizer only: serve builds its own engine
    door = serve_door.Door(serve_door.Limits(request_timeout=args.request_timeout,
                                             max_connections=args.max_connections,
                                             shutdown_grace=args.shutdown_grace))
    engine = Engine(gen.parts, max_num_seqs=cfg.seqs, max_model_len=max_len, kv_cache_dtype=cfg.kv_cache_dtype,
                    page_size=cfg.page_size, num_pages=pool.num_pages, prefix_caching=cfg.prefix_caching,
                    prefill_chunk=cfg.prefill_chunk, max_queue=cfg.max_queue, decode=gen.decode, on_fatal=door.fail)
    _serve_faults(engine)
    name = args.served_model_name or storage.basename(requested)
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
        fail(f"the engine stopped ({type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''})"
             "; the server exited so that it can be restarted", status=1)


def _serve_faults(engine) -> None:
    """Test-only: NORMISTRAL_FAULTS="engine_fails_at_step=N" makes the engine's N-th step raise, as a
    device error would (tests/inference/test_server_hostile.py checks the server then exits 1)."""
    # NORMISTRAL_FAULTS="name=N,..." as training/checkpoint.py `fault` reads it (inference/ does not import training/)
    faults = {key.strip(): value for key, _, value in
              (item.partition("=") for item in os.environ.get("NORMISTRAL_FAULTS", "").split(","))}
    at = int(faults["engine_fails_at_step"]) if faults.get("engine_fails_at_step", "").strip() else None
    if at is None:
        return
    step, count = engine.step, [0]

    def failing_step():
        count[0] += 1
        if count[0] >= at:
            raise RuntimeError("injected fault: engine_fails_at_step")
        step()

    engine.step = failing_step


def add_serve(sub) -> None:
    from inference.config import add_config_flag

    p = sub.add_parser("serve", help="an OpenAI-compatible completions server (continuous batching engine)")
    p.add_argument("model_dir", help=MODEL_HELP)
    add_config_flag(p, "serve")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    add_quantize_flags(p)
    p.add_argument("--kv-cache-dtype", choices=["int8"], help="int8 KV cache (default: the compute dtype)")
    add_pool_flags(p)
    add_mesh_flag(p, "device mesh (default: --config's mesh, else one device)")
    p.add_argument("--max-queue", type=int, help="waiting requests beyond which the server answers 429 (default 256)")
    p.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill call and row (default 256)")
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
