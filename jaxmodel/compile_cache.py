"""JAX's persistent compilation cache for the commands that compile a model (generate, serve, eval), and a
process-wide count of compilations and cache hits.

Inside: `cache_dir()` (where it lives), `enable(on=True) -> path or None`, `CompileCount` (compilations,
persistent-cache hits and misses seen by `jax.monitoring` since it was made) and `ENV`.

The cache is on by default under the user's cache directory: $XDG_CACHE_HOME/normistral/jax, else
~/.cache/normistral/jax. `--no-compile-cache` or NORMISTRAL_COMPILE_CACHE=0 turn it off. Every program
is written, however fast it compiled and however small (both of JAX's thresholds at their minimum): the
engine's programs for a tiny model compile in well under JAX's default second, and a second process on the
same model must find them all. JAX keys an entry by the program, the devices and the compiler options, so
a changed model, shape or JAX version simply misses; an entry is never wrong, only absent.
"""

from __future__ import annotations

import os
import threading

import jax

ENV = "NORMISTRAL_COMPILE_CACHE"  # 0: off; 1 (or unset): on

_COMPILE = "/jax/core/compile/backend_compile_duration"  # every compilation, a persistent-cache hit included
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"


class CompileCacheError(ValueError):
    """NORMISTRAL_COMPILE_CACHE set to something other than 0 or 1."""


def cache_dir() -> str:
    """$XDG_CACHE_HOME/normistral/jax, or ~/.cache/normistral/jax when XDG_CACHE_HOME is unset or empty."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "normistral", "jax")


def wanted(on: bool = True) -> bool:
    """Whether the cache should be on: `on` (False for --no-compile-cache) and NORMISTRAL_COMPILE_CACHE not 0.
    Raises CompileCacheError (a one-line message naming the variable) for any other value than 0 or 1."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise CompileCacheError(f"{ENV}={value!r}: expected 0 (off) or 1 (on)")
    return on and value != "0"


def enable(on: bool = True) -> str | None:
    """Turns JAX's persistent compilation cache on (unless `wanted(on)` says off) -> its directory, or None
    when off. A directory that cannot be made leaves the cache off with a warning (compiling still works)."""
    if not wanted(on):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        import sys

        print(f"normistral: warning: compilation cache off: cannot create {path} ({(e.strerror or str(e)).lower()})",
              file=sys.stderr)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size threshold at all
    return path


# -- counting ----------------------------------------------------------------------------------------------

_COUNTS = {_COMPILE: 0, _REQUEST: 0, _HIT: 0, _MISS: 0}
_LOCK = threading.Lock()
_registered = False


def _on_event(event: str, *args, **kwargs) -> None:
    if event in _COUNTS:
        with _LOCK:
            _COUNTS[event] += 1


def _register() -> None:
    """Registers the two listeners once per process (jax.monitoring's listeners are global and never removed)."""
    global _registered
    with _LOCK:
        if _registered:
            return
        _registered = True
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_event)


class CompileCount:
    """Compilations in this process since it was made (all threads): `compiled` (XLA compilations,
    persistent-cache hits included, as JAX counts them), `hits` (programs loaded from the persistent cache)
    and `misses` (programs the cache did not hold: really compiled, then written)."""

    def __init__(self):
        _register()
        self._start = self._now()

    @staticmethod
    def _now() -> dict:
        with _LOCK:
            return dict(_COUNTS)

    def _since(self, event: str) -> int:
        return self._now()[event] - self._start[event]

    @property
    def compiled(self) -> int:
        return self._since(_COMPILE)

    @property
    def hits(self) -> int:
        return self._since(_HIT)

    @property
    def misses(self) -> int:
        return self._since(_MISS)

    def summary(self) -> str:
        """For a progress line: 'N compilations, H from the persistent cache' (or '..., persistent cache off')."""
        n = self.compiled
        if not n:
            return "nothing compiled"
        where = f"{self.hits} from the persistent cache" if self._since(_REQUEST) else "persistent cache off"
        return f"{n} compilation{'s' if n != 1 else ''}, {where}"
