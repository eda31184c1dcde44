"""Google Cloud Storage for the storage layer (`jaxmodel.storage`): gcsfs with bounded waits, and its
failures as one line.

Inside: `filesystem()` (a gcsfs file system with this module's retry policy and credentials), `failure(e,
path)` (the one line for an error that says Google Cloud Storage could not be used, else None).
`jaxmodel.storage` is the only user: it picks this backend for gs:// paths and turns the line into its
StorageError; this module does not import it back.

Design choices:
- Bounded waits on `gs://`: gcsfs retries every failed request 6 times with backoff (~35 s) and logs a
  traceback each time, so a host that cannot be reached at all (no network, a wrong emulator address)
  stalled a command for minutes. Here a connection that cannot be opened is tried `CONNECT_ATTEMPTS` times
  (a `CONNECT_TIMEOUT_S` each), other transient failures (5xx, 429, a dropped connection) keep gcsfs'
  6 attempts, an open connection that stays silent for `READ_TIMEOUT_S` fails, and gcsfs' own log lines
  are silenced: the one line says it once.
- Credentials: a token the user configured in fsspec, else the application default credentials, else
  anonymous access (the GCS emulator of the tests, public buckets).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import sys

import fsspec

CONNECT_TIMEOUT_S = 5  # opening a TCP connection (DNS and TLS excluded)
READ_TIMEOUT_S = 120  # silence on an open connection (a large object streams; only a stall fails)
CONNECT_ATTEMPTS = 3  # a host that cannot be reached at all: fail within ~20 s
ATTEMPTS = 6  # other transient failures, as gcsfs


def filesystem():
    """A gcsfs file system for gs:// paths. No listings cache: other processes (the other hosts, a rerun,
    Orbax) change the bucket meanwhile."""
    return _bounded_class()(use_listings_cache=False, requests_timeout=_timeout(), **_token())


@functools.cache
def _bounded_class():
    """gcsfs' file system with this module's retry policy (gcsfs binds its own at class creation)."""
    import gcsfs

    # Each failed request would log a warning or a traceback; the StorageError raised instead says it once.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    core = gcsfs.core.GCSFileSystem
    bounded = type("BoundedGCSFileSystem", (core,), {
        "_request": _with_retries(core._request.__wrapped__),
        "_get_file_request": _with_retries(core._get_file_request.__wrapped__),
        # Its inner requests (_info, _get_file_request, _cat_file) retry already; retrying the whole
        # download again would multiply the attempts.
        "_get_file_concurrent": core._get_file_concurrent.__wrapped__,
    })
    if gcsfs.GCSFileSystem is core:
        return bounded
    # The experimental file system (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT, on by default) overrides some of these
    # and calls super(): with `bounded` after it in the MRO, those calls land on the bounded versions.
    return type("BoundedExtendedGcsFileSystem", (gcsfs.GCSFileSystem, bounded), {})


@functools.cache
def _token() -> dict:
    """gcsfs' `token` argument: unless the user configured one (fsspec's config, FSSPEC_GS_TOKEN), the
    application default credentials when there are some, else anonymous access. gcsfs' own sequence would
    next ask the metadata server ("cloud"), which off Google Cloud retries for ~15 s; on Google Cloud the
    default credentials already come from it."""
    import google.auth
    import google.auth.exceptions

    if any("token" in fsspec.config.conf.get(protocol, {}) for protocol in ("gs", "gcs")):
        return {}
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return {"token": "anon"}
    return {"token": "google_default"}


def _timeout():
    import aiohttp

    return aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)


def _with_retries(request):
    """`request` (an undecorated gcsfs coroutine method) retried with this module's bounds."""
    from gcsfs.retry import is_retriable

    @functools.wraps(request)
    async def retried(self, *args, **kwargs):
        attempt = 0
        while True:
            try:
                return await request(self, *args, **kwargs)
            except Exception as e:
                attempt += 1
                limit = CONNECT_ATTEMPTS if _cannot_connect(e) else ATTEMPTS
                if attempt >= limit or getattr(e, "status", None) == 404 or not is_retriable(e):
                    raise
                await asyncio.sleep(min(2 ** (attempt - 1), 16) * (0.5 + random.random() / 2))

    return retried


def _cannot_connect(e: BaseException) -> bool:
    import aiohttp

    return isinstance(e, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def failure(e: BaseException, path) -> str | None:
    """One line naming `path` (a gs:// URL) when `e` says Google Cloud Storage could not be used (no
    network, a timeout, refused or missing credentials); None for any other error."""
    if "gcsfs" not in sys.modules:  # gcsfs never ran: `e` is not about Google Cloud Storage
        return None
    import aiohttp
    import fsspec.exceptions
    import google.auth.exceptions
    from gcsfs.retry import HttpError

    shown = os.fspath(path)
    if _cannot_connect(e):
        host = f"{e.host}:{e.port}" if isinstance(e, aiohttp.ClientConnectorError) else "the storage server"
        os_error = getattr(e, "os_error", None)
        code = getattr(os_error, "errno", None)
        if code:  # a name that does not resolve has a negative (getaddrinfo) code and its own text
            cause = os_error.strerror if code < 0 else os.strerror(code)
        else:
            cause = "timed out" if isinstance(e, TimeoutError) else str(e)
        return (f"{shown}: cannot connect to Google Cloud Storage at {host} ({cause.lower()}; "
                f"{CONNECT_ATTEMPTS} tries)")
    if isinstance(e, (TimeoutError, asyncio.TimeoutError, fsspec.exceptions.FSTimeoutError)):
        return f"{shown}: Google Cloud Storage did not answer within {READ_TIMEOUT_S} s"
    if isinstance(e, aiohttp.ClientError):
        return f"{shown}: Google Cloud Storage connection failed ({e or type(e).__name__})"
    if isinstance(e, google.auth.exceptions.GoogleAuthError):
        return f"{shown}: Google Cloud credentials failed ({_auth_cause(str(e))})"
    denied = type(e) is OSError and str(e).startswith("Forbidden")  # gcsfs' 403
    if denied or (isinstance(e, HttpError) and e.code in (401, 403)):
        return f"{shown}: access denied by Google Cloud Storage{_credentials_hint(path)}"
    if isinstance(e, HttpError):
        return f"{shown}: Google Cloud Storage answered {e.code} ({str(e).splitlines()[0]})"
    return None


def _auth_cause(text: str) -> str:
    """google-auth's text for a token server it could not reach (urllib3's nested "Max retries exceeded
    ... Caused by ... [Errno N] reason" chain) as "cannot reach HOST (reason)"; other texts' first line."""
    import re

    host = re.search(r"host='([^']+)'", text)
    reason = re.findall(r"\[Errno -?\d+\] ([^)\]]+)", text)
    if host and reason:
        return f"cannot reach {host.group(1)} ({reason[-1].strip().lower()})"
    return text.splitlines()[0] if text else "no reason given"


def _credentials_hint(path) -> str:
    with contextlib.suppress(Exception):
        if os.fspath(path).startswith(("gs://", "gcs://")) and filesystem().credentials.method == "anon":
            return ("; no credentials were found (run `gcloud auth application-default login` or set "
                    "GOOGLE_APPLICATION_CREDENTIALS)")
    return ""
