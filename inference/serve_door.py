"""The door of `normistral serve` (inference/server.py builds the API behind it): connections, limits,
shutdown and the process, nothing about what a request asks.

Inside: `Limits` (the serve flags' limits), `Door` (what every connection shares: each live request's update
queue, draining, a dead engine; `Halt` is what it posts to end a request), `read_body` (a body under the
limits) and `watch_disconnect`, `bind_socket` and `check_memory` -> `Pool` (both run before the model loads),
`url_of`, and `run` (uvicorn with the door's h11 protocol and signal handling). Also what the API shares
with the door: `ApiError` (an OpenAI-shaped error with its status), `unavailable` (a 503 with Retry-After),
`ServeError` (a serve option that cannot work), `MAX_BODY_BYTES`, `RETRY_AFTER`. This module never imports
inference/server.py.

The limits (`Limits`): a body over `max_body_bytes` -> 413 as soon as the count passes; request headers not
complete within `request_timeout` -> 408 and the connection closed; a body not complete within it -> 408;
more than `max_connections` open connections -> 503 and closed. A client that disconnects (streaming or
not) cancels its request within one engine step (`watch_disconnect` halts a plain request; Starlette ends a
stream). SIGTERM or Ctrl-C drains: listening stops, queued requests get 503, running ones finish within
`shutdown_grace` seconds (then a stream gets an error event and [DONE], a plain request 503), and the
process exits 0; a second Ctrl-C ends every request at once. If the engine's loop dies (`Door.fail`, the
engine's on_fatal, or `Door.watch` seeing its thread gone), every waiting client gets a 500 and `run`
returns the failure (the command exits 1 for a supervisor).
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import socket
from dataclasses import dataclass

import uvicorn
from fastapi import Request as HttpRequest
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from inference.engine import Engine, Request
from inference.generate import GenerateError

MAX_BODY_BYTES = 4 << 20
RETRY_AFTER = "1"  # seconds, on 429 and 503: the queue turns over in about that time


class ServeError(GenerateError):
    """A serve option that cannot work (a port that cannot be bound, a cache that does not fit)."""


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout: float = 30.0  # seconds for a request's headers, and again for its body
    max_connections: int = 512  # open connections (idle keep-alive ones included)
    shutdown_grace: float = 10.0  # seconds running requests get to finish after SIGTERM / Ctrl-C


class ApiError(Exception):
    """An error answer: its HTTP status and OpenAI's error body (`body()`), with any extra headers."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unavailable(message: str) -> ApiError:
    """A 503 (draining, a dead engine, too many connections) telling the client when to retry."""
    return ApiError(503, message, type="server_error", code="service_unavailable", headers={"Retry-After": RETRY_AFTER})


def one_line(e: BaseException) -> str:
    """An exception's message for an error line: its first line, at most 120 characters (its type if empty)."""
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


# -- the door: what every connection shares ---------------------------------------------------------------


class Halt:
    """Posted to a request's update queue when it must end now; `error` is what its client gets."""

    def __init__(self, error: ApiError):
        self.error = error


class Door:
    """The server's shared state: each live request's update queue (with its engine requests), whether
    the server is draining (SIGTERM / Ctrl-C), and the failure that stopped the engine, if any."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.live: dict[asyncio.Queue, list[Request]] = {}
        self.draining = False
        self.failure: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: Engine | None = None
        self.stop_server = lambda: None  # set by `run`: asks uvicorn to stop

    def check_open(self) -> None:
        """Before a request is taken: 503 once the engine died or the server is draining."""
        if self.failure is not None:
            raise unavailable(f"the engine stopped ({one_line(self.failure)}); the server is exiting")
        if self.draining:
            raise unavailable("the server is shutting down")

    def fail(self, error: BaseException) -> None:
        """The engine's loop died (called from any thread, e.g. as the engine's on_fatal): every live
        request gets a 500, and the server stops (`run` returns the failure)."""
        loop = self.loop
        try:
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._fail, error)
                return
        except RuntimeError:  # the loop closed meanwhile
            pass
        self.failure = self.failure or error

    def _fail(self, error: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = error
        self.halt_all(ApiError(500, f"the engine stopped: {one_line(error)}", type="server_error"))
        self.stop_server()

    def drain(self) -> None:
        """SIGTERM / Ctrl-C (on the loop): queued requests get 503 now, running ones `shutdown_grace`
        seconds to finish, then their end (an error event for a stream, 503 otherwise)."""
        if self.draining:
            return
        self.draining = True
        queued = self._queued()
        gone = unavailable("the server is shutting down; this request had not started")
        for updates, reqs in list(self.live.items()):
            if any(id(r) in queued for r in reqs):
                self._halt(updates, gone)
        self.loop.call_later(self.limits.shutdown_grace, self.halt_all,
                             unavailable(f"the server is shutting down (the request ran past the "
                                         f"{self.limits.shutdown_grace:g} s grace)"))

    def halt_all(self, error: ApiError | None = None) -> None:
        for updates in list(self.live):
            self._halt(updates, error or unavailable("the server is shutting down"))

    def _halt(self, updates: asyncio.Queue, error: ApiError) -> None:
        reqs = self.live.pop(updates, ())
        for r in reqs:  # the handler cancels them too; doing it here frees the slots a step sooner
            if not r.finished:
                self.engine.cancel(r)
        updates.put_nowait(Halt(error))

    def _queued(self) -> set:
        """Ids of the requests still waiting in the engine's queue (the engine thread mutates it under its
        lock)."""
        engine = self.engine
        with engine._lock:
            return {id(r) for r in engine.queue}

    async def watch(self) -> None:
        """A backstop for an engine thread that ends without calling on_fatal: checked twice a second."""
        while True:
            await asyncio.sleep(0.5)
            thread = self.engine._thread
            if thread is not None and not thread.is_alive() and self.failure is None:
                self._fail(self.engine.fatal or RuntimeError("the engine's thread ended"))


async def read_body(http: HttpRequest, limits: Limits) -> bytes:
    """The body, counted while it arrives (413 as soon as it passes the limit, whether or not it declared a
    Content-Length) and timed (408 when it is not complete within request_timeout)."""
    close = {"Connection": "close"}  # the rest of the body is not read: this connection cannot go on
    length = http.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", headers=close)
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in http.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"request body over {limits.max_body_bytes} bytes", headers=close)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout=limits.request_timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body was not complete within {limits.request_timeout:g} s "
                       f"(--request-timeout)", headers=close) from None
    except ClientDisconnect:
        raise ApiError(400, "client disconnected") from None
    return b"".join(chunks)


async def watch_disconnect(receive, updates: asyncio.Queue) -> None:
    """Posts a halt when the client hangs up (the body is read: the next ASGI message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    updates.put_nowait(Halt(ApiError(400, "client disconnected")))


# -- serving: the socket, the memory check, uvicorn ----------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one; `getsockname()` says which), made before the
    model loads so a bad --host / --port fails at once. Connections made while the model loads wait in
    the backlog."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"--host {host}: not an address of this machine ({one_line(e)})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart next to TIME_WAIT connections
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ServeError(f"--host {host} --port {port}: cannot listen there ({(e.strerror or str(e)).lower()})") \
            from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


@dataclass(frozen=True)
class Pool:
    """The KV cache pool `check_memory` settled on: `num_pages` pages of `page_bytes` (all layers)."""
    num_pages: int
    page_bytes: int

    @property
    def bytes(self) -> int:
        return self.num_pages * self.page_bytes


DEFAULT_FRACTION = 0.9  # of the memory free after the weights: the default pool's cap (vLLM's default too)


def check_memory(config, *, max_num_seqs: int, max_model_len: int, page_size: int, kv_cache_memory: int | float | None,
                 dtype, kv_cache_dtype: str | None, quantize: str | None, devices,
                 seqs_flag: str = "--max-num-seqs") -> Pool:
    """The KV cache pool for the serve flags, or a ServeError naming the flag, before anything is allocated.
    Free memory is the devices' (host memory on CPU) less the weights (estimated from the parameter count).
    --kv-cache-memory bytes: that many; a fraction: that share of the free memory; unset: pages for
    --max-num-seqs sequences of --max-model-len tokens, at most DEFAULT_FRACTION of the free memory. Refused:
    a pool that with the weights exceeds the free memory, one that cannot hold one --max-model-len sequence
    (the engine would have to refuse requests it accepted), and more sequences than pages (each running
    sequence holds at least one). Page bytes come from the function that sizes the pool (jaxmodel/kv_cache.py).
    `generate` checks its flags here too (its --batch-size is the sequence count: `seqs_flag`)."""
    import jax.numpy as jnp

    from jaxmodel.kv_cache import page_bytes, pages_per_seq, pool_dtype

    page = page_bytes(config, page_size, kv_cache_dtype, pool_dtype(config, dtype=dtype, kv_dtype=kv_cache_dtype))
    per_seq = pages_per_seq(max_model_len, page_size)
    per_weight = {"int8": 1.0, "int4": 0.5}.get(quantize, jnp.dtype(dtype).itemsize)
    weights = int(config.num_params() * per_weight)
    free, where = _free_memory(devices)
    room = None if free is None else free - weights
    if room is not None and room <= 0:
        raise ServeError(f"the weights need about {weights / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of "
                         f"{where} memory free; try --quantize int8 or a --mesh over more devices")
    if isinstance(kv_cache_memory, float):
        if room is None:
            raise ServeError(f"--kv-cache-memory {kv_cache_memory}: the {where} does not report its free memory; "
                             "give the pool in bytes (e.g. 4GiB)")
        pool = int(kv_cache_memory * room)
    elif kv_cache_memory is not None:
        pool = kv_cache_memory
    else:
        pool = max_num_seqs * per_seq * page
        if room is not None:
            pool = min(pool, int(DEFAULT_FRACTION * room))
    flag = "the KV cache pool" if kv_cache_memory is None else f"--kv-cache-memory {kv_cache_memory}"
    if room is not None and pool > room:
        raise ServeError(f"{flag}: {pool / 2**30:.2f} GiB of pages and about {weights / 2**30:.1f} GiB of weights "
                         f"are more than the {free / 2**30:.1f} GiB of {where} memory free")
    pages = pool // page
    if pages < per_seq:
        raise ServeError(f"{flag}: {pages} pages of {page_size} tokens ({pool} bytes at {page} bytes a page) cannot "
                         f"hold one sequence of --max-model-len {max_model_len} ({per_seq} pages); raise "
                         "--kv-cache-memory or lower --max-model-len")
    if max_num_seqs > pages:
        raise ServeError(f"{seqs_flag} {max_num_seqs}: more sequences than the pool's {pages} pages (each running "
                         "sequence holds at least one); lower it or raise --kv-cache-memory")
    return Pool(pages, page)


def _free_memory(devices) -> tuple[int | None, str]:
    """Free bytes on the devices (their allocator's limit less what is in use), or the host's available
    memory on CPU; None where a device does not say."""
    if devices[0].platform == "cpu":
        import psutil

        return psutil.virtual_memory().available, "host"
    stats = [d.memory_stats() for d in devices]
    if not all(s and "bytes_limit" in s for s in stats):
        return None, "device"
    return sum(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats), f"{devices[0].platform} device"


def _door_protocol(limits: Limits) -> type:
    """uvicorn's h11 protocol with the door's connection limits. uvicorn 0.54 has no header timeout: a
    connection must complete a request's headers within request_timeout of opening (or of its previous
    answer), or it is answered 408 and closed; a connection past max_connections is answered 503 and
    closed at once (a silent socket must not hold a slot for long, nor can a crowd of them exhaust the
    process's descriptors)."""

    class DoorProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(_raw(503, unavailable(f"more than {limits.max_connections} open connections "
                                                      "(--max-connections)")))
                transport.close()
                return
            self._arm()

        def _arm(self):
            self._deadline = self.loop.call_later(limits.request_timeout, self._no_headers)

        def _no_headers(self):
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                error = ApiError(408, f"no complete request headers within {limits.request_timeout:g} s "
                                 "(--request-timeout)")
                self.transport.write(_raw(408, error))
                self.transport.close()

        def on_response_complete(self):
            super().on_response_complete()
            if self._deadline is not None:
                self._deadline.cancel()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return DoorProtocol


def _raw(status: int, error: ApiError) -> bytes:
    """A whole HTTP/1.1 answer written outside h11 (no request was read): the error's JSON, then close."""
    body = json.dumps(error.body()).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    retry = b"retry-after: " + RETRY_AFTER.encode() + b"\r\n" if status == 503 else b""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n").encode() + retry + b"\r\n" + body


class _Server(uvicorn.Server):
    """uvicorn's server, whose SIGTERM and Ctrl-C drain the door (see `Door.drain`) and are not raised
    again once it stopped (uvicorn re-raises them: the process would die by the signal instead of
    exiting 0 after a clean drain). A second Ctrl-C ends every request at once."""

    def __init__(self, config: uvicorn.Config, door: Door):
        super().__init__(config)
        self.door = door

    def handle_exit(self, sig, frame) -> None:
        force = self.should_exit and sig == signal.SIGINT
        self.should_exit = True
        self.force_exit = self.force_exit or force
        loop = self.door.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.door.halt_all if force else self.door.drain)


def run(app, sock: socket.socket) -> BaseException | None:
    """Serves `app` (from `create_app`) on `sock` until SIGTERM / Ctrl-C (a drain) or the engine's failure;
    returns that failure (None after a clean stop)."""
    door: Door = app.state.door
    grace = door.limits.shutdown_grace
    config = uvicorn.Config(app, http=_door_protocol(door.limits), log_level="warning", lifespan="on",
                            timeout_keep_alive=5, timeout_graceful_shutdown=math.ceil(grace) + 5)
    server = _Server(config, door)

    def stop():
        server.should_exit = True

    door.stop_server = stop
    server.run(sockets=[sock])
    return door.failure
