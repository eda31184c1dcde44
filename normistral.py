"""The `normistral` command: parser assembly, dispatch, and the error and signal plumbing; nothing else.

Each command lives beside the code it drives and registers itself (`add_commands(subparsers)`):
jaxmodel/cli.py (import-hf, export-hf, parity; the shared flag types and groups, and compile-check's shared
half), training/cli.py (build-tokenizer, prepare-data, train, export-lora, compile-check --mode train) and
inference/cli.py (generate, eval, and serve in inference/serve_cli.py; compile-check --mode prefill/decode).
What spans packages is joined here, since jaxmodel/ imports neither package and training/ and inference/
do not import each other: compile-check's modes, the check of every config section, the trainer's eval hook.
Plus demo (normistral_demo.py).

Errors that a user can cause (a bad path, a checkpoint that does not match its config, ...) print one line
`normistral: error: ...` and exit with status 2; anything else is a bug and keeps its traceback. Ctrl-C and
SIGTERM end a run with one line and status 130 / 143.
"""

from __future__ import annotations

import os
import sys

from inference import cli as inference_cli
from jaxmodel import cli
from training import cli as training_cli

QUANTIZE_CHOICES = cli.QUANTIZE_CHOICES  # its old home (tests/inference/test_quantize.py checks it)


def _check_sections(tree: dict) -> None:
    """Reads every section of a run config (model, mesh, train, optimizer, data, checkpoint, lora, inference),
    so an unknown key or a bad value anywhere is an error whichever command reads the file."""
    from inference.config import inference_config
    from training.config import load

    load(tree)
    if tree.get("inference") is not None:
        inference_config(tree)


COMPILE_MODES = {"train": training_cli.compile_train_mode, "prefill": inference_cli.compile_prefill_mode,
                 "decode": inference_cli.compile_decode_mode}


def _compile_check(args) -> None:
    cli.compile_check(args, COMPILE_MODES, _check_sections, inference_cli.print_engine)


def _demo(args):
    if args.steps < 2:  # checked before anything is built
        raise cli.CommandError(f"argument --steps: the demo needs at least 2 training steps (it stops halfway "
                               f"and resumes), got {args.steps}")
    from normistral_demo import run_demo

    run_demo(args.workdir, steps=args.steps)


def build_parser() -> cli.Parser:
    parser = cli.Parser(prog="normistral", description="NorMistral-11b-long in JAX: convert, train, generate, serve, "
                        "evaluate, compile-check.")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_commands(sub)
    cli.add_compile_check(sub, _compile_check)
    training_cli.add_commands(sub, check_sections=_check_sections, eval_hook=inference_cli.train_eval_hook)
    inference_cli.add_commands(sub)
    p = sub.add_parser("demo", help="the end-to-end run on a tiny local checkpoint (the Quickstart's main job)")
    p.add_argument("--workdir", default="demo-run", help="created (or a previous demo's, replaced)")
    p.add_argument("--steps", type=cli.positive_int, default=300,
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
        what, status = cli.interruption()
        try:
            cli.fail(f"{what}; outputs being written were removed, finished ones kept", status=status)
        except SystemExit:
            if argv is None:  # the program itself (not a call from Python): end now. A computation or compile
                # still running in native threads can crash the interpreter's shutdown (a segfault, exit -11).
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
            raise


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
        cli.mark_terminated()
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
    from jaxmodel.orbax_stream import OrbaxInternalsError
    from jaxmodel.safetensors_io import WeightFileError
    from jaxmodel.sharding import ShardingError
    from jaxmodel.storage import StorageError

    user_errors = (ConfigError, ConvertError, ShardingError, TopologyError, cli.CommandError, GenerateError,
                   DistributedError, OrbaxInternalsError, StorageError, TemplateError, WeightFileError)
    try:
        args.func(args)
    except user_errors as e:
        cli.fail(str(e))
    except OSError as e:
        if e.filename is None and isinstance(e, (FileNotFoundError, NotADirectoryError, FileExistsError)):
            cli.fail(str(e))  # raised with a message of ours ("PATH: no such file")
        if e.filename is None:
            raise  # not about a path the user gave: a bug, keep the traceback
        cli.fail(_os_error_line(e))


def _os_error_line(e: OSError) -> str:
    """`PATH: reason` for an OSError about a user's path, naming the user's path rather than a temporary
    sibling (`.NAME.tmp-PID-XXXX` -> NAME)."""
    import re

    path = re.sub(r"(^|/)\.([^/]+)\.tmp-\d+-[^/]+", r"\1\2", os.fsdecode(e.filename))
    return f"{path}: {(e.strerror or str(e)).lower()}"


class _LineTracking:
    """sys.stderr, remembering whether its last write ended a line. A signal can land inside a progress
    bar's close(), between its last redraw (ending in a carriage return) and its newline: that bar is no
    longer open for `cli.close_progress_bars`, and the error line must still start a line of its own."""

    def __init__(self, stream):
        self._stream = stream
        self.mid_line = False

    def write(self, text):
        if text:
            self.mid_line = not text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


if __name__ == "__main__":
    main()
