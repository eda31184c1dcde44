"""The OpenAI-compatible HTTP API of `normistral serve`: a thin shell around `inference.engine.Engine`.

Inside: `create_app(engine, tokenizer, model_name, door)` (a FastAPI app) and the server-sent event stream.
A body's validation and the answer's JSON are inference/completions.py. What is about connections
rather than requests (the limits, `Door`, the socket, the memory check, signals,
uvicorn: `run`) lives in inference/serve_door.py.

Endpoints:
- POST /v1/completions: prompt (a string, a list of strings, a list of token ids, or a list of those),
  max_tokens (default 16, 0 allowed with echo), temperature (default 1; 0 = greedy), top_p, top_k (0 or
  -1 = off, at most the vocabulary), seed, stop (a string or up to 4), stream (server-sent events in
  OpenAI's chunk format, ending with `data: [DONE]`; stream_options.include_usage adds a usage chunk),
  logprobs (0-5 alternatives), echo, n (only 1). echo + logprobs gives the prompt tokens'
  log-probabilities too (max_tokens=0: only those, what evaluation harnesses ask for).
- GET /v1/models, GET /health, GET /metrics (Prometheus text: queue depth, active slots, tokens/s, time to
  first token, counters).
- /v1/chat/completions answers 404 saying why (a base model has no chat template).
Every error is OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}) with a 4xx status
(5xx only for a server fault); the engine keeps running whatever a request holds. Bodies are parsed by
hand (size-limited while they are read, UTF-8 checked, JSON checked without NaN/Infinity, lone UTF-16
surrogates refused, every field type- and range-checked), never trusted. Parsing and building answers
(an echo+logprobs answer can be megabytes) run in worker threads, so /health stays prompt.

A full engine queue -> 429 with Retry-After; more prompts than the queue can ever hold -> 400; a request
that arrives while draining or after the engine died -> 503 (the door's other limits: serve_door.py).
A request the engine fails gets a 500 server_error (a stream: an error event, then [DONE]).

The engine steps in its own thread (started by the caller: `engine.start()`); each request's `on_update`
(called there) posts a snapshot to the request's asyncio queue with `loop.call_soon_threadsafe`, so the
event loop never blocks on the device.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.completions import (
    MAX_PROMPTS,
    Completion,
    Tokens,
    answer,
    completion_logprobs,
    echo_text,
    parse_completion,
    prompt_logprobs_of,
    usage,
)
from inference.engine import Engine, EngineError, EngineFull, EngineStopped, Request
from inference.serve_door import RETRY_AFTER, ApiError, Door, Halt, read_body, unavailable, watch_disconnect


def _engine_failure(reqs) -> ApiError | None:
    """A request the engine ended with an error (or an abort the client did not ask for) -> the 500 to send."""
    for r in reqs:
        if r.finish_reason not in ("stop", "length"):
            why = r.error or f"the engine ended the request ({r.finish_reason})"
            return ApiError(500, f"the server failed on this request: {why}", type="server_error")
    return None


def _error_response(e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# -- the app -----------------------------------------------------------------------------------------


def create_app(engine: Engine, tokenizer, model_name: str, door: Door | None = None):
    door = door or Door()
    door.engine = engine

    @asynccontextmanager
    async def lifespan(_):
        door.loop = asyncio.get_running_loop()
        if door.failure is not None:  # the engine died before the loop ran (`fail` could not reach it)
            door.stop_server()
        watch = asyncio.create_task(door.watch())
        yield
        watch.cancel()

    app = FastAPI(title="normistral serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.door = door
    tok = Tokens(tokenizer)
    created = int(time.time())
    config = engine.config

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(ApiError(e.status_code, message, type=kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e):
        return _error_response(ApiError(400, str(e)[:300]))

    @app.exception_handler(Exception)
    async def server_error(_, e):
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

    @app.get("/health")
    async def health():
        if door.failure is not None or engine._thread is None or not engine._thread.is_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if door.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "normistral", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        m = engine.metrics()
        lines = []
        for key, help_text in (("queue_depth", "requests waiting for a slot"),
                               ("active_slots", "slots prefilling or decoding"), ("slots", "decode slots"),
                               ("tokens_per_second", "generated tokens per second over the last 10 s"),
                               ("generated_tokens_total", "generated tokens"),
                               ("finished_requests_total", "finished requests"),
                               ("aborted_requests_total", "requests cancelled (client gone)"),
                               ("ttft_seconds_p50", "median time to first token (last 1000 requests)"),
                               ("ttft_seconds_p99", "99th percentile time to first token"),
                               ("decode_steps_total", "decode steps"), ("prefill_calls_total", "prefill calls"),
                               ("prefill_tokens_total", "prefill tokens computed (padding included)"),
                               ("failed_requests_total", "requests the engine ended with an error"),
                               ("compiles_total", "XLA compilations by the engine (none after warm-up)"),
                               ("kv_cache_bytes", "KV cache size"),
                               ("kv_pages_total", "KV cache pages in the pool"),
                               ("kv_pages_free", "KV cache pages free"),
                               ("kv_pages_cached", "KV cache pages holding cached prefixes, reusable"),
                               ("prefix_hit_tokens_total", "prompt tokens found in cached pages, not computed"),
                               ("prefix_hit_requests_total", "requests that reused cached prefix pages"),
                               ("prompt_tokens_total", "prompt tokens"),
                               ("preemptions_total", "sequences preempted (recomputed later) for lack of pages")):
            value = m[key]
            lines += [f"# HELP normistral_{key} {help_text}", f"# TYPE normistral_{key} gauge",
                      f"normistral_{key} {'NaN' if value is None else value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.api_route("/v1/chat/completions", methods=["GET", "POST"])
    async def chat():
        raise ApiError(404, f"'{model_name}' is a base model with no chat template: /v1/chat/completions is not "
                       "served; use /v1/completions", type="not_found_error")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        door.check_open()
        raw = await read_body(http, door.limits)
        c = await asyncio.to_thread(parse_completion, raw, tokenizer=tokenizer, model_name=model_name,
                                    max_model_len=engine.max_model_len, vocab_size=config.vocab_size,
                                    max_prompts=min(MAX_PROMPTS, engine.max_queue))
        door.check_open()  # the server may have started draining while the body was parsed
        updates: asyncio.Queue = asyncio.Queue()
        reqs = _requests(c, tokenizer, updates)
        _submit(engine, reqs)
        door.live[updates] = reqs
        rid = f"cmpl-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        if c.stream:
            return _Events(_stream(reqs, updates, c, tok, head), lambda: _release(door, engine, updates, reqs))
        watcher = asyncio.create_task(watch_disconnect(http.receive, updates))
        try:
            while not all(r.finished for r in reqs):
                update = await updates.get()
                if isinstance(update, Halt):
                    raise update.error
        finally:
            watcher.cancel()
            _release(door, engine, updates, reqs)
        failure = _engine_failure(reqs)
        if failure is not None:
            raise failure
        return Response(await asyncio.to_thread(answer, c, reqs, tok, head), media_type="application/json")

    return app


def _requests(c: Completion, tokenizer, updates: asyncio.Queue) -> list[Request]:
    """One engine Request per prompt; each posts its snapshots to `updates` (from the engine's thread):
    every token when streaming, else only its end."""
    loop = asyncio.get_running_loop()
    seed = c.seed if c.seed is not None else secrets.randbits(31)
    eos = frozenset() if tokenizer.eos_token_id is None else frozenset({int(tokenizer.eos_token_id)})

    def post(r, i):
        if not c.stream and r.finish_reason is None:
            return
        snapshot = (i, len(r.tokens), r.stable_text() if r.incremental else "", r.finish_reason)
        try:
            loop.call_soon_threadsafe(updates.put_nowait, snapshot)
        except RuntimeError:  # the event loop closed (the server stopped): nobody is waiting
            pass

    return [Request(ids, max_tokens=c.max_tokens, stop_ids=eos, stop_strings=c.stop, temperature=c.temperature,
                    top_k=c.top_k, top_p=c.top_p, seed=seed, stream_id=i, logprobs=c.logprobs or 0,
                    prompt_logprobs=c.echo and c.logprobs is not None,
                    on_update=lambda r, i=i: post(r, i), incremental=c.stream)
            for i, ids in enumerate(c.prompts)]


def _submit(engine: Engine, reqs) -> None:
    """All of a request's prompts, or none (429 when the queue is full)."""
    submitted = []
    try:
        for r in reqs:
            engine.submit(r)
            submitted.append(r)
    except EngineFull as e:
        for r in submitted:
            engine.cancel(r)
        raise ApiError(429, f"server overloaded: {e}; retry later", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": RETRY_AFTER}) from None
    except EngineError as e:
        for r in submitted:
            engine.cancel(r)
        if isinstance(e, EngineStopped):
            raise unavailable(str(e)) from None
        raise ApiError(400, str(e)) from None


def _release(door: Door, engine: Engine, updates: asyncio.Queue, reqs) -> None:
    """A request's handler ended (answered, failed, or its client left): unfinished prompts are cancelled."""
    door.live.pop(updates, None)
    for r in reqs:
        if not r.finished:
            engine.cancel(r)


class _Events(StreamingResponse):
    """Server-sent events whose `release` runs however the response ends: also when the client left
    before the stream began (the generator, never started, would not run its own cleanup)."""

    def __init__(self, events, release):
        super().__init__(events, media_type="text/event-stream")
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _echo_chunk(chunk, c: Completion, i: int, tok: Tokens, r: Request) -> str:
    return chunk(i, echo_text(c, i, tok, r), prompt_logprobs_of(tok, r, c.logprobs), None)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(reqs, updates: asyncio.Queue, c: Completion, tok: Tokens, head: dict):
    """Server-sent events: text deltas (with their tokens' logprobs), a final chunk per prompt with its
    finish_reason, then [DONE]. A request that fails (the engine's error, a shutdown past its grace) ends
    with an error event, then [DONE]. A client that goes away cancels this generator (Starlette watches
    the connection while it streams); `_Events` then frees the slots."""

    def chunk(i, text, lp, finish):
        return _event({**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})

    sent_text, sent_tokens, done = [0] * len(reqs), [0] * len(reqs), [False] * len(reqs)
    echoed = [not c.echo] * len(reqs)
    if c.echo and c.logprobs is None:  # nothing to wait for: every prompt's text first
        for i, r in enumerate(reqs):
            yield chunk(i, echo_text(c, i, tok, r), None, None)
        echoed = [True] * len(reqs)
    while not all(done):
        update = await updates.get()
        if isinstance(update, Halt):
            yield _event(update.error.body())
            break
        i, n, text, finish = update
        if done[i]:
            continue
        r = reqs[i]
        failure = _engine_failure([r]) if finish is not None else None
        if failure is not None:
            yield _event(failure.body())
            break
        if not echoed[i]:  # echo + logprobs: the prompt's log-probabilities came with its prefill, before this
            echoed[i] = True
            yield await asyncio.to_thread(_echo_chunk, chunk, c, i, tok, r)
        if finish is not None:
            text, n = r.text, len(r.tokens)
        delta = text[sent_text[i]:] if len(text) >= sent_text[i] else ""
        if not delta and finish is None:
            continue
        lp = None
        if c.logprobs is not None:
            lp = completion_logprobs(tok, r, c.logprobs, sent_tokens[i], n, sent_text[i])
            sent_tokens[i] = n
        sent_text[i] += len(delta)
        done[i] = finish is not None
        yield chunk(i, delta, lp, finish)
    if all(done) and c.include_usage:  # OpenAI's stream_options: one more chunk, no choices, the token counts
        yield _event({**head, "choices": [], "usage": usage(reqs)})
    yield "data: [DONE]\n\n"
