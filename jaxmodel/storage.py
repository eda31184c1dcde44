"""One storage layer: every path a user gives the project (local or `gs://`) goes through this module.

Inside:
- `StorageError`: a path problem the user can fix (one line naming the path).
- Paths: `is_remote`, `resolve`, `join`, `under` (a path relative to a base), `parent`, `basename`.
- Queries and plain I/O: `exists`, `isdir`, `isfile`, `listdir`, `glob`, `size`, `makedirs`, `remove`,
  `open`, `read_ranges`, `read_text` / `write_text`, `read_json` / `write_json`, `copy_file`, `copy_dir`,
  `local_copy`, `upload_dir`; `map_threads` (one call per item, 32 in flight: requests are latency-bound).
- `gs://` failures as one line: `unreachable` turns a network, timeout or credentials error of a remote path
  into a StorageError naming the path and the cause (`remote_errors` does it for the functions here).
- Outputs that are never half-written: `atomic_directory`, `atomic_file` / `atomic_write`, `check_output_dir`,
  `check_output_file`, `is_committed`, `require_committed`, `check_bucket`; inputs: `check_input_file`,
  `check_input_dir`.

Design choices:
- fsspec is the one code path: `LocalFileSystem` for local paths, `gcsfs` for `gs://` (it honours
  `STORAGE_EMULATOR_HOST`, which the tests point at a GCS emulator on localhost). Arrays do not come
  through here: Orbax and TensorStore take `gs://` URLs natively and get them from `resolve`.
- Local outputs keep the rename scheme: written into a hidden temporary sibling (`.NAME.tmp-PID-XXXX`)
  and renamed into place. A rerun removes the stale temporaries of its own target left by a killed run
  (their PID is no longer alive).
- Object stores have no atomic directory rename. A directory output there starts with a `_WRITING`
  marker and ends with a `_COMMITTED` marker written last; readers refuse a directory that has the first
  and not the second (an interrupted write) and name it. A directory written by other tools (an HF model
  uploaded with gsutil) has neither and reads as usual. A single object is atomic by itself (an upload
  appears only when finalized), so `atomic_file` writes locally and uploads once at the end.
- gs:// waits are bounded (a host that cannot be reached fails within ~20 s, not minutes of gcsfs retries)
  and its failures are one line: `jaxmodel.gcs`.
- One file (~550 lines) on purpose: it is the one door every user path goes through (STYLE: one storage
  layer), so a caller imports one module; only the gs:// backend, which nothing else calls, lives apart.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
import uuid

import fsspec

from jaxmodel import gcs

WRITING = "_WRITING"
COMMITTED = "_COMMITTED"
_TMP_INFIX = ".tmp-"


class StorageError(ValueError):
    """A path the user gave that cannot be used (missing, wrong kind, unwritable, uncommitted)."""


# -- paths --------------------------------------------------------------------------------------------


def is_remote(path) -> bool:
    """True for a URL with a scheme other than file:// (gs://, and any other fsspec protocol)."""
    path = os.fspath(path)
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme not in ("", "file")


def resolve(path) -> str:
    """A canonical form: an absolute local path, or the URL without a trailing slash."""
    path = os.fspath(path)
    if is_remote(path):
        scheme, _, rest = path.partition("://")
        return f"{scheme}://{rest.rstrip('/')}"
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(os.path.expanduser(path))


def join(base, *parts: str) -> str:
    base = os.fspath(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def under(base, path) -> str:
    """`path` as given when it is absolute or a URL, else `path` inside `base` (resolved)."""
    path = os.fspath(path)
    if is_remote(path) or os.path.isabs(path) or path.startswith("file://"):
        return resolve(path)
    return resolve(join(base, path))


def parent(path) -> str:
    path = resolve(path)
    if is_remote(path):
        head, _, _ = path.rpartition("/")
        return head if "://" in head and not head.endswith("://") else path
    return os.path.dirname(path)


def basename(path) -> str:
    path = resolve(path)
    return path.rpartition("/")[2] if is_remote(path) else os.path.basename(path)


def fs_and_path(path):
    """(file system, path as that file system spells it) for a local path or URL."""
    path = resolve(path)
    if path.startswith(("gs://", "gcs://")):
        fs = gcs.filesystem()
        return fs, fs._strip_protocol(path)
    if is_remote(path):
        return fsspec.core.url_to_fs(path, use_listings_cache=False)
    return fsspec.filesystem("file", auto_mkdir=True), path  # writes create parents, as on object stores


def unreachable(e: BaseException, path) -> StorageError | None:
    """A StorageError naming `path` when `e` says Google Cloud Storage could not be used (no network, a
    timeout, refused or missing credentials); None for any other error."""
    if not is_remote(path):
        return None
    line = gcs.failure(e, path)
    return None if line is None else StorageError(line)


def remote_errors(func):
    """Decorates a function whose arguments include paths: a failure to use `gs://` becomes a StorageError
    naming the first remote path argument."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except StorageError:
            raise
        except Exception as e:
            remote = next((a for a in args if isinstance(a, (str, os.PathLike)) and is_remote(a)), None)
            error = unreachable(e, remote) if remote is not None else None
            if error is None:
                raise
            raise error from None

    return wrapper


def _url(fs, inner: str, like: str) -> str:
    """The full URL of `inner` (a path as `fs` spells it), in the form of `like` (remote or local)."""
    if not is_remote(like):
        return inner
    scheme = like.partition("://")[0]
    return f"{scheme}://{inner.lstrip('/')}"


def bucket(path) -> str | None:
    """gs://BUCKET of a remote path (None for local paths)."""
    path = resolve(path)
    if not is_remote(path):
        return None
    scheme, _, rest = path.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


# -- queries and plain I/O ----------------------------------------------------------------------------


@remote_errors
def exists(path) -> bool:
    fs, p = fs_and_path(path)
    return fs.exists(p)


@remote_errors
def isdir(path) -> bool:
    fs, p = fs_and_path(path)
    return fs.isdir(p)


@remote_errors
def isfile(path) -> bool:
    fs, p = fs_and_path(path)
    return fs.isfile(p)


@remote_errors
def listdir(path) -> list[str]:
    """Entry names (not paths) of a directory, sorted; [] if it does not exist."""
    fs, p = fs_and_path(path)
    if not fs.isdir(p):
        return []
    return sorted({e.rstrip("/").rpartition("/")[2] for e in fs.ls(p, detail=False)} - {""})


@remote_errors
def glob(pattern) -> list[str]:
    """Sorted paths (URLs for remote patterns) matching a glob pattern."""
    fs, p = fs_and_path(pattern)
    return sorted(_url(fs, m, os.fspath(pattern)) for m in fs.glob(p))


@remote_errors
def size(path) -> int:
    fs, p = fs_and_path(path)
    return int(fs.size(p))


def makedirs(path) -> None:
    """Creates a directory and its parents (a no-op on object stores, which have no directories)."""
    fs, p = fs_and_path(path)
    if is_remote(path):
        return
    fs.makedirs(p, exist_ok=True)


@remote_errors
def remove(path) -> None:
    """Removes a file or a directory tree; a missing path is fine."""
    fs, p = fs_and_path(path)
    with contextlib.suppress(FileNotFoundError):
        if fs.isdir(p):
            fs.rm(p, recursive=True)
        elif fs.exists(p):
            fs.rm(p)


@remote_errors
def open(path, mode: str = "r", *, encoding: str | None = "utf-8", **kwargs):  # noqa: A001
    """A file object (text with UTF-8 by default; pass a "b" mode for bytes)."""
    fs, p = fs_and_path(path)
    if "b" in mode:
        return fs.open(p, mode, **kwargs)
    return fs.open(p, mode, encoding=encoding, **kwargs)


@remote_errors
def read_ranges(path, starts, ends) -> list[bytes]:
    """The byte ranges [start, end) of one file; on object stores fetched concurrently (one request
    each, all in flight together)."""
    fs, p = fs_and_path(path)
    starts, ends = [int(s) for s in starts], [int(e) for e in ends]
    return fs.cat_ranges([p] * len(starts), starts, ends)


@remote_errors
def read_text(path) -> str:
    with open(path) as f:
        return f.read()


@remote_errors
def write_text(path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read_json(path):
    return json.loads(read_text(path))


def write_json(path, value, *, indent: int | None = 2) -> None:
    write_text(path, json.dumps(value, indent=indent))


def map_threads(fn, items) -> list:
    """[fn(x) for x in items], 32 at a time (object-store requests are latency-bound); the first error, in
    order."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(32, len(items))) as pool:
        return list(pool.map(fn, items))


@remote_errors
def copy_file(src, dst) -> None:
    """Copies one file between any two locations (local or remote, either way)."""
    src, dst = resolve(src), resolve(dst)
    if not is_remote(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not is_remote(src) and not is_remote(dst):
        shutil.copy(src, dst)
        return
    if is_remote(dst) and not is_remote(src):
        fs, p = fs_and_path(dst)
        fs.put_file(src, p)
        return
    if is_remote(src) and not is_remote(dst):
        fs, p = fs_and_path(src)
        fs.get_file(p, dst)
        return
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 * 1024**2)


@remote_errors
def copy_dir(src, dst) -> None:
    """Copies a directory tree between any two locations (commit markers excepted: the copy's own
    writer commits it)."""
    src = resolve(src)
    fs, p = fs_and_path(src)
    p = p.rstrip("/")
    for inner in fs.find(p):
        rel = inner[len(p) + 1:] if inner.startswith(p + "/") else inner.rpartition("/")[2]
        if rel in (WRITING, COMMITTED):
            continue
        copy_file(_url(fs, inner, src), join(dst, *rel.split("/")))


def upload_dir(local_dir: str, remote_dir: str) -> None:
    """Copies a local directory tree into `remote_dir` (any location)."""
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        for name in files:
            parts = [] if rel == "." else rel.split(os.sep)
            copy_file(os.path.join(root, name), join(remote_dir, *parts, name))


@contextlib.contextmanager
def local_copy(path, *, names: tuple[str, ...] | None = None):
    """Yields a local path holding `path`'s content: the path itself when local; for a remote file or
    directory, a temporary download (only the entries in `names`, if given), deleted afterwards. For
    libraries that only read local files (tokenizers)."""
    path = resolve(path)
    if not is_remote(path):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="normistral-download-")
    try:
        if isfile(path):
            local = os.path.join(tmp, basename(path))
            copy_file(path, local)
            yield local
            return
        for name in listdir(path):
            if (names is None or name in names) and isfile(join(path, name)):
                copy_file(join(path, name), os.path.join(tmp, name))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- inputs -------------------------------------------------------------------------------------------


def _missing(path: str) -> StorageError:
    b = bucket(path)
    if b is not None and not exists(b):
        return StorageError(f"{path}: bucket {b} does not exist")
    return StorageError(f"{path}: no such file or directory")


def check_input_file(path, what: str = "file") -> str:
    """The resolved path of an existing file, or a StorageError naming it."""
    shown = os.fspath(path)
    if isdir(path):
        raise StorageError(f"{shown}: is a directory, expected a {what}")
    if not exists(path):
        raise _missing(shown)
    return resolve(path)


def check_input_dir(path, what: str = "directory") -> str:
    """The resolved path of an existing, committed directory, or a StorageError naming it."""
    shown = os.fspath(path)
    if not isdir(path):
        if exists(path):
            raise StorageError(f"{shown}: is a file, expected a {what}")
        raise _missing(shown)
    require_committed(path, what)
    return resolve(path)


# -- outputs ------------------------------------------------------------------------------------------


def check_bucket(path) -> str:
    """The resolved path; for a URL, a StorageError naming it when its bucket does not exist."""
    b = bucket(path)
    if b is not None and not exists(b):
        raise StorageError(f"{os.fspath(path)}: bucket {b} does not exist")
    return resolve(path)


def is_committed(path) -> bool:
    """False only for a directory whose write was interrupted (object stores; local writes rename)."""
    return not (exists(join(path, WRITING)) and not exists(join(path, COMMITTED)))


def require_committed(path, what: str = "directory") -> None:
    if not is_committed(path):
        raise StorageError(f"{os.fspath(path)}: uncommitted {what} (a run writing it was interrupted); "
                           "delete it and write it again")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_temporaries(target: str) -> None:
    """Removes `.NAME.tmp-PID-*` siblings of a local target whose writer is no longer running."""
    head, name = os.path.split(target)
    prefix = f".{name}{_TMP_INFIX}"
    with contextlib.suppress(OSError):
        for entry in os.listdir(head):
            if not entry.startswith(prefix):
                continue
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                stale = os.path.join(head, entry)
                shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.unlink(stale)
                print(f"normistral: removed {stale}, left by an interrupted run", file=sys.stderr)


def _writable_parent(target: str, *, create: bool) -> None:
    """Raises a StorageError naming the user's path when `target`'s parent cannot hold it."""
    head = os.path.dirname(target)
    if create:
        try:
            os.makedirs(head, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{target}: cannot create its parent directory ({e.strerror})") from None
    elif not os.path.isdir(head):
        raise StorageError(f"{target}: parent directory {head} does not exist")
    if not os.access(head, os.W_OK | os.X_OK):
        raise StorageError(f"{target}: parent directory {head} is not writable")
    # access() says yes to root and knows nothing of read-only mounts or pseudo file systems (/sys, /proc):
    # create (and remove) an entry of the kind the writer will make, named as its temporaries are.
    probe = os.path.join(head, f".{os.path.basename(target)}{_TMP_INFIX}{os.getpid()}-probe")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except FileExistsError:
        pass
    except OSError as e:
        raise StorageError(f"{target}: cannot write in {head} ({(e.strerror or str(e)).lower()})") from None


def check_output_dir(path, *, create_parents: bool = True) -> str:
    """Checks, before any work, that `path` can become a new output directory; returns it resolved."""
    target = resolve(path)
    shown = os.fspath(path)
    if is_remote(target):
        check_bucket(path)
        if exists(join(target, COMMITTED)) or (listdir(target) and not exists(join(target, WRITING))):
            raise StorageError(f"{shown}: output directory already exists and is not empty")
        return target
    if os.path.exists(target) and not os.path.isdir(target):
        raise StorageError(f"{shown}: exists and is a file, expected a new directory")
    if os.path.isdir(target) and os.listdir(target):
        raise StorageError(f"{shown}: output directory already exists and is not empty")
    _writable_parent(target, create=create_parents)
    return target


def check_output_file(path) -> str:
    """Checks, before any work, that `path` can become a new output file; returns it resolved."""
    target = resolve(path)
    shown = os.fspath(path)
    if is_remote(target):
        check_bucket(path)
        if isdir(target):
            raise StorageError(f"{shown}: is a directory, expected a file")
        return target
    if os.path.isdir(target):
        raise StorageError(f"{shown}: is a directory, expected a file")
    _writable_parent(target, create=False)
    return target


@contextlib.contextmanager
def atomic_directory(path, *, create_parents: bool = True):
    """Yields a directory to write into (a local path, or the target URL on an object store) that
    becomes the committed `path` only if the block succeeds; on failure nothing committed remains."""
    target = check_output_dir(path, create_parents=create_parents)
    if is_remote(target):
        if listdir(target):  # an earlier run's uncommitted write (it has only _WRITING): start afresh
            remove(target)
            print(f"normistral: removed {target}, left uncommitted by an interrupted run", file=sys.stderr)
        write_text(join(target, WRITING), "")
        try:
            yield target
            write_text(join(target, COMMITTED), "")
        except BaseException:
            with contextlib.suppress(Exception):
                remove(target)
            raise
        return
    _clean_stale_temporaries(target)
    tmp = os.path.join(os.path.dirname(target),
                       f".{os.path.basename(target)}{_TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.isdir(target):
            os.rmdir(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
    """Yields a file open for writing that becomes `path` only if the block succeeds (None: yields None,
    writes nothing), after checking that `path` can be an output and removing stale temporaries of it
    (see `atomic_write`)."""
    if path is None:
        yield None
        return
    target = check_output_file(path)
    if not is_remote(target):
        _clean_stale_temporaries(target)
    with atomic_write(target, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """Yields a file open for writing that becomes `path` only if the block succeeds; no checks first
    (for the many files of a job that checked its output once). Local: a temporary sibling
    (`.NAME.tmp-PID-*`, created with the umask's permissions) renamed into place; remote: a local
    temporary uploaded once at the end (an object appears only when its upload completes; a streamed
    upload would be committed by its close even after an error)."""
    target = resolve(path)
    if is_remote(target):
        fd, tmp = tempfile.mkstemp(prefix="normistral-upload-")
    else:
        tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}{_TMP_INFIX}{os.getpid()}-"
                                                    f"{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with builtins.open(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        if is_remote(target):
            copy_file(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def os_error(e: OSError, path) -> StorageError:
    """An OSError about a user's path as one StorageError line (no raw `[Errno N]`)."""
    reason = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
    return StorageError(f"{os.fspath(path)}: {reason.lower() if reason else e}")
