"""Write a standard Orbax checkpoint one slice at a time, with bounded host memory.

Inside:
  save_streaming(directory, abstract_tree, fill, *, progress=None)
      Writes the checkpoint; `fill(path, index)` supplies the data.
  num_writes(abstract_tree)
      How many times `progress` will be called (a tqdm `total`).
  CHUNK_BYTE_SIZE
      Upper bound on the byte size of one stored chunk.
  tune_malloc(), trim_malloc()
      glibc malloc settings that return freed buffers to the OS (convert.py and parity.py use them too).
  orbax_internals(), OrbaxInternalsError, ORBAX_CHECKED
      The private Orbax helpers this module needs, resolved in one place (see the end of this docstring).

Why: converting an 11B Hugging Face checkpoint produces stacked layer weights such
as (40, 5120, 14336) bf16 = 5.9 GB, while the source yields one layer at a time.
Building the stacked arrays and calling `StandardCheckpointer.save` would need
several of them in memory at once. Here the peak is about two slices, and it does
not grow with the number of layers. (Measured: +300 MiB for 140 MiB slices with
2, 4 or 12 layers; +35 to +50 MiB for 16 MiB slices, which is the test.)

Design choices that are not obvious:

* Orbax does all the bookkeeping. We save with an ordinary
  `ocp.Checkpointer(ocp.PyTreeCheckpointHandler(...))`. Its own TypeHandlerRegistry,
  separate from the global one, maps a placeholder leaf type, `_Leaf`, to
  `_StreamingArrayHandler`. That handler subclasses Orbax's `ArrayHandler` and
  overrides only `serialize`; its `typestr()` is inherited ('jax.Array').
  _METADATA, array_metadatas/, _sharding, the OCDBT manifest and
  commit_success.txt are therefore what `StandardCheckpointer.save` writes for a
  tree of single-device jax.Arrays. The unmodified ArrayHandler restores the result:
  `ocp.StandardCheckpointer().restore(dir, target)` with any sharding, or with no
  target. Nothing from this module is needed to read it.
* Chunk layout. We describe a stacked leaf to Orbax's TensorStore spec builder as
  if it were sharded along axis 0, one layer per shard
  (write_shape = (1, *shape[1:])). Each chunk then lies inside a single layer, so
  writing layer i replaces whole chunks. Nothing is read back and modified, and
  no half-filled chunk is kept in memory. With the full shape as write_shape,
  Orbax could choose chunks that span many layers, and every slice write would
  touch all of them.
* Chunks are also capped at CHUNK_BYTE_SIZE, the standard `SaveArgs.chunk_byte_size`.
  A sharded restore then reads and decompresses only about its own part, and zstd
  compresses the chunks of one slice in parallel.
* Slices are written one after another, and each write is awaited until it is
  committed. We use no TensorStore transaction: Orbax's ArrayHandler wraps all
  writes in one atomic OCDBT transaction, which keeps every value in memory until
  the commit. Here each slice is a small OCDBT commit of its own. Orbax's finalize
  step merges the per-process OCDBT tree into the root as usual.
* glibc malloc is tuned for the rest of the process (see `tune_malloc`), and
  trimmed after every slice. Without that, freed buffers stay in the arenas of
  TensorStore's threads, and RSS climbs to several slices.
* `fill` and `progress` run on an Orbax background thread, one call at a time,
  while the calling thread waits.
* Atomicity. Orbax writes into `<parent>/.<name>.*.partial/checkpoint`, a staging
  directory beside `directory`, so both are on the same filesystem. Orbax renames
  its own temporary directory inside the staging directory; we then rename the
  result to `directory`. On any error the staging directory, with anything Orbax
  left in it, is deleted and the exception propagates.
  On an object store (`gs://`, no rename) Orbax writes in place and marks the
  checkpoint complete with its `commit_success.txt`; the caller's
  `storage.atomic_directory` markers cover the directory around it, and an
  interrupted save is removed here as well.
* On an object store the arrays are stored without OCDBT (plain zarr: one object
  per chunk, each written once). Per-slice OCDBT commits would be a
  read-modify-write of the database manifest per slice (two round trips each,
  serialized, conditional on the object's generation); plain chunks need none.
  Orbax restores both layouts the same way.
* Ctrl-C. While the save runs, SIGINT only sets a flag that the writer checks
  before each slice; it then stops (a cancellation Orbax does not log) and the
  save raises KeyboardInterrupt once nothing writes into the staging directory.

Single process only (an offline conversion tool, not multi-host training).

Orbax internals: the writer calls the helpers Orbax's own ArrayHandler uses (so the files follow the
installed Orbax's layout), which live in the private `orbax.checkpoint._src`, and reads three private
attributes of ArrayHandler. All of them are named in `_PRIVATE` / `_HANDLER_ATTRIBUTES` and resolved only
by `orbax_internals()`, checked against orbax-checkpoint `ORBAX_CHECKED`; a name that moved raises
`OrbaxInternalsError` naming it (before anything is written), and tests/jaxmodel/test_orbax_internals.py
fails the same way. tests/jaxmodel/test_orbax_stream.py catches layout drift.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import importlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

__all__ = ["CHUNK_BYTE_SIZE", "ORBAX_CHECKED", "OrbaxInternalsError", "num_writes", "orbax_internals",
           "save_streaming", "trim_malloc", "tune_malloc"]

# The orbax-checkpoint version whose private names (`_PRIVATE`, `_HANDLER_ATTRIBUTES`) were checked.
ORBAX_CHECKED = "0.12.8"

# What this module takes from Orbax's private `_src` package: our name -> (module, attribute). These are
# the helpers ArrayHandler itself uses, so the files we write follow the installed Orbax's layout.
_PRIVATE = {
    "CommitFuture": ("orbax.checkpoint._src.futures.future", "CommitFutureAwaitingContractedSignals"),
    "ArrayMetadataStore": ("orbax.checkpoint._src.metadata.array_metadata_store", "Store"),
    "process_index": ("orbax.checkpoint._src.multihost.multihost", "process_index"),
    "serialize_shardings": ("orbax.checkpoint._src.serialization.jax_array_handlers", "_async_serialize_shardings"),
    "subdir_process_index": ("orbax.checkpoint._src.serialization.ocdbt_utils", "get_process_index_for_subdir"),
    "build_array_write_spec": ("orbax.checkpoint._src.serialization.tensorstore_utils", "build_array_write_spec"),
}
# Private attributes an `ocp.type_handlers.ArrayHandler` sets in __init__ and the writer reads.
_HANDLER_ATTRIBUTES = ("_primary_host", "_metadata_key", "_array_metadata_store")


class OrbaxInternalsError(RuntimeError):
    """A private Orbax name this module relies on is gone from the installed orbax-checkpoint."""


def _moved(what: str) -> OrbaxInternalsError:
    from importlib.metadata import version

    return OrbaxInternalsError(
        f"orbax-checkpoint {version('orbax-checkpoint')}: {what} is gone or moved (jaxmodel/orbax_stream.py "
        f"was checked against orbax-checkpoint {ORBAX_CHECKED}); install orbax-checkpoint=={ORBAX_CHECKED} "
        "or update orbax_stream._PRIVATE")


@functools.cache
def orbax_internals() -> SimpleNamespace:
    """The private Orbax helpers of `_PRIVATE` (by our names), the only place this module reaches into
    `orbax.checkpoint._src`, and the check of ArrayHandler's private attributes. Raises
    OrbaxInternalsError naming the first one that moved."""
    found = {}
    for ours, (module, name) in _PRIVATE.items():
        try:
            found[ours] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise _moved(f"{module}.{name}") from None
    handler = ocp.type_handlers.ArrayHandler()
    for name in _HANDLER_ATTRIBUTES:
        if not hasattr(handler, name):
            raise _moved(f"orbax.checkpoint.type_handlers.ArrayHandler().{name}")
    return SimpleNamespace(**found)


# 16 MiB gives a few chunks per layer slice: small enough for sharded reads and
# parallel compression, large enough to keep OCDBT keys and per-chunk overhead low
# (about 1.4k chunks for 23 GB).
CHUNK_BYTE_SIZE = 16 * 2**20

STACKED_KEY = "layers"

KeyPath = tuple[str, ...]
Fill = Callable[[KeyPath, int | None], np.ndarray]
Progress = Callable[[int], Any]


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """What Orbax sees as a leaf value: the array's description only. The data comes from `fill`."""

    path: KeyPath
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def stacked(self) -> bool:
        return STACKED_KEY in self.path


def _leaves(abstract_tree: Any) -> Any:
    """The abstract tree with each jax.ShapeDtypeStruct replaced by a `_Leaf`."""

    def to_leaf(keypath, sds):
        path = tuple(getattr(k, "key", None) for k in keypath)
        if not all(isinstance(k, str) for k in path):
            raise TypeError(f"only nested dicts with str keys are supported, got path {keypath}")
        if not isinstance(sds, jax.ShapeDtypeStruct):
            raise TypeError(f"leaf {path} must be a jax.ShapeDtypeStruct, got {type(sds)}")
        leaf = _Leaf(path, tuple(sds.shape), np.dtype(sds.dtype))
        if leaf.stacked and not leaf.shape:
            raise ValueError(f"stacked leaf {path} needs a leading layers axis, got shape ()")
        return leaf

    return jax.tree_util.tree_map_with_path(to_leaf, abstract_tree)


def num_writes(abstract_tree: Any) -> int:
    """Number of `progress` calls `save_streaming` makes: one per slice or unstacked array."""
    leaves = jax.tree_util.tree_leaves(_leaves(abstract_tree))
    return sum(leaf.shape[0] if leaf.stacked else 1 for leaf in leaves)


class _StreamingArrayHandler(ocp.type_handlers.ArrayHandler):
    """Writes `_Leaf`s slice by slice. Orbax records them as 'jax.Array' (inherited typestr)."""

    def __init__(self, fill: Fill, progress: Progress | None, array_metadata_store):
        super().__init__(array_metadata_store=array_metadata_store)
        self._fill = fill
        self._progress = progress
        self.cancelled = threading.Event()  # set on Ctrl-C: stop before the next slice

    async def serialize(self, values: Sequence[_Leaf], infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        # As in the stock handlers, all I/O happens in the commit future. That
        # future starts only once Orbax has created the directory.
        return [orbax_internals().CommitFuture(self._write_all(values, infos, args), name="streaming_array_handler")]

    async def _write_all(self, leaves, infos, args) -> None:
        for info in infos:
            await info.await_path_creation()
        # Record the sharding that `jax.device_put(x)` would give. A restore with
        # no target then behaves as it does for an Orbax save of host arrays.
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        orbax = orbax_internals()
        await orbax.serialize_shardings([sharding] * len(leaves), infos, primary_host=self._primary_host)
        metadatas = [await self._write_leaf(*lia) for lia in zip(leaves, infos, args)]
        # Per-array write_shape/chunk_shape records. Orbax copies write_shape into
        # _METADATA and cross-checks these records at finalize.
        await self._array_metadata_store.write(
            checkpoint_dir=infos[0].parent_dir,
            array_metadatas=metadatas,
            process_index=orbax.process_index(),
        )

    async def _write_leaf(self, leaf: _Leaf, info, arg):
        write_shape = (1, *leaf.shape[1:]) if leaf.stacked else leaf.shape
        orbax = orbax_internals()
        spec = orbax.build_array_write_spec(
            info=info,
            arg=arg,
            global_shape=leaf.shape,
            local_shape=write_shape,
            dtype=leaf.dtype,
            use_ocdbt=info.is_ocdbt_checkpoint,
            process_index=orbax.subdir_process_index(info.is_ocdbt_checkpoint),
            metadata_key=self._metadata_key,
        )
        array = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
        for index in range(leaf.shape[0]) if leaf.stacked else [None]:
            if self.cancelled.is_set():  # Orbax treats a CancelledError as a quiet cancellation
                raise asyncio.CancelledError("interrupted")
            value = self._fetch(leaf, index)
            target = array if index is None else array[index]
            # Awaiting the write waits for its commit, so only one slice is held at
            # a time. Referencing `value` avoids a copy; we drop it right after.
            await target.write(value, can_reference_source_data_indefinitely=True)
            del value
            trim_malloc()
            if self._progress is not None:
                self._progress(1)
        return spec.metadata

    def _fetch(self, leaf: _Leaf, index: int | None) -> np.ndarray:
        value = np.asarray(self._fill(leaf.path, index))
        shape = leaf.shape if index is None else leaf.shape[1:]
        # Refuse rather than cast: the checkpoint must hold exactly what `fill` returned.
        if value.shape != shape or value.dtype != leaf.dtype:
            raise ValueError(
                f"fill({leaf.path}, {index}) returned {value.dtype}{list(value.shape)}, "
                f"expected {leaf.dtype}{list(shape)}"
            )
        return value


# glibc. After the first large free, glibc raises its mmap and trim thresholds; the
# mmap one goes up to 32 MiB, and importing jax already triggers this. From then on,
# freed slice and chunk buffers stay in the per-thread arenas of TensorStore's thread
# pools, and RSS settles at several slices (measured: +140 MiB instead of +48 MiB for
# 16 MiB slices).
try:
    _LIBC = ctypes.CDLL(None)  # the running process's symbols, libc included
except (OSError, TypeError):  # e.g. Windows
    _LIBC = None
_MMAP_THRESHOLD = 2**20


def tune_malloc() -> None:
    """Fix the thresholds, as MALLOC_MMAP_THRESHOLD_ would at startup. Blocks of 1 MiB or more are
    then mmapped and returned to the OS on free, and arena tops are trimmed. Small allocations are
    unaffected. No-op without glibc, or if the user set either variable."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD)  # the ratio glibc itself uses


def trim_malloc() -> None:
    """Release free memory already sitting inside the arenas. Threshold changes only affect later frees."""
    malloc_trim = getattr(_LIBC, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


@contextlib.contextmanager
def _interrupt_stops(cancelled: threading.Event):
    """Ctrl-C (SIGINT) during the save sets `cancelled` instead of raising in the waiting main thread:
    the background writer stops before its next slice and the save ends with KeyboardInterrupt only once
    nothing writes into the staging directory any more (raised at once, the staging directory would be
    deleted under the writer, which then logs a page of tracebacks)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: cancelled.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def save_streaming(
    directory: str | os.PathLike,
    abstract_tree: Any,
    fill: Fill,
    *,
    progress: Progress | None = None,
) -> None:
    """Writes a standard Orbax checkpoint at `directory`, calling `fill` for the data.

    abstract_tree: a nested dict (string keys) whose leaves are jax.ShapeDtypeStruct.
    fill(path: tuple[str, ...], index: int | None) -> np.ndarray
        A leaf is "stacked" when its path contains the key 'layers'. For a stacked
        leaf, fill is called once per index along axis 0 and must return that slice,
        of shape leaf.shape[1:]. For any other leaf, fill(path, None) returns the
        full array. The dtype must match exactly. Calls happen one at a time, on an
        Orbax background thread.
    progress: optional callable(n), called with n=1 after each slice or unstacked
        array is written. `num_writes(abstract_tree)` gives the total.

    `directory` must not exist. It appears only once the save is complete, through
    an atomic rename of a staging sibling. On any exception the staging directory is
    deleted and the exception is re-raised. Side effect: in this process, glibc
    malloc's mmap/trim thresholds stay fixed afterwards (see `tune_malloc`).
    Raises OrbaxInternalsError, before anything is written, when the installed Orbax lacks a private name
    this module uses.
    Restore with plain Orbax, e.g. `ocp.StandardCheckpointer().restore(directory, target)`.
    """
    from jaxmodel import storage

    if storage.exists(directory):
        raise FileExistsError(f"{directory} already exists")
    if jax.process_count() != 1:
        raise NotImplementedError("save_streaming supports a single process only")
    orbax = orbax_internals()  # fails here, on a moved name, not halfway through the save
    leaves = _leaves(abstract_tree)
    tune_malloc()

    # A registry private to this call, leaving Orbax's global one untouched. Both
    # handlers share one ArrayMetadata store: the pytree handler finds the store
    # through the jax.Array entry, so it reads the records our handler writes.
    store = orbax.ArrayMetadataStore()
    handler = _StreamingArrayHandler(fill, progress, store)
    registry = ocp.type_handlers.create_type_handler_registry(
        (_Leaf, handler),
        (jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=store)),
    )
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTE_SIZE), leaves)

    remote = storage.is_remote(directory)
    tree_handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=not remote)
    if remote:
        url = storage.resolve(directory)
        try:
            with _interrupt_stops(handler.cancelled), ocp.Checkpointer(tree_handler) as ckptr:
                ckptr.save(url, args=ocp.args.PyTreeSave(leaves, save_args=save_args))
            if handler.cancelled.is_set():
                raise KeyboardInterrupt
        except BaseException:
            storage.remove(url)
            raise
        return
    directory = Path(storage.resolve(directory))  # OCDBT specs need an absolute path
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        staged = staging / "checkpoint"
        with _interrupt_stops(handler.cancelled), ocp.Checkpointer(tree_handler) as ckptr:
            try:
                ckptr.save(staged, args=ocp.args.PyTreeSave(leaves, save_args=save_args))
            except (asyncio.CancelledError, concurrent.futures.CancelledError):
                if handler.cancelled.is_set():
                    raise KeyboardInterrupt from None
                raise
        if handler.cancelled.is_set():  # Ctrl-C after the last slice: still not a finished output
            raise KeyboardInterrupt
        # rename(2) silently replaces an empty directory. Check again, so that a
        # directory someone created meanwhile is not replaced.
        if directory.exists():
            raise FileExistsError(f"{directory} appeared while saving")
        os.rename(staged, directory)
    finally:
        # After success only the empty staging directory is left. After a failure,
        # this also removes Orbax's temporary directory inside it.
        shutil.rmtree(staging, ignore_errors=True)
