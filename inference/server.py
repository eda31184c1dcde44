"""The OpenAI-compatible HTTP API of `normistral serve`: a thin shell around `inference.engine.Engine`.

Inside: `create_app(engine, tokenizer, model_name, door)` (a FastAPI app), `parse_completion(body, ...)` (the
validation of a /v1/completions body), the response builders and the server-sent event stream. What is
about connections rather than requests (the limits, `Door`, the socket, the memory check, signals,
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
import math
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.engine import TOP_LOGPROBS, Engine, EngineError, EngineFull, EngineStopped, Request
from inference.serve_door import (
    MAX_BODY_BYTES,
    RETRY_AFTER,
    ApiError,
    Door,
    Halt,
    one_line,
    read_body,
    unavailable,
    watch_disconnect,
)
from jaxmodel.checks import is_utf8

MAX_STOP = 4
MAX_PROMPTS = 64

@dataclass
class Completion:
    prompts: list  # token id lists
    prompt_texts: list  # the prompt strings (for echo); None for token-id prompts
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple
    stream: bool
    logprobs: int | None
    echo: bool
    include_usage: bool = False


def _field(body, name, kinds, default, *, check=None, what=None):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    ok = ok and not (isinstance(value, float) and not math.isfinite(value))  # 1e999 parses as inf
    if not ok or (check is not None and not check(value)):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


def _no_constant(name: str):
    """json.loads takes NaN, Infinity and -Infinity, which are not JSON (and no sampling value)."""
    raise ApiError(400, f"request body is not valid JSON ({name} is not a JSON number)")


def _check_unicode(body: dict) -> None:
    """Refuses a lone UTF-16 surrogate anywhere in the body: JSON's "\\ud800" parses into a Python str
    that the tokenizer and the response encoder cannot handle (it is no character)."""
    for key, value in body.items():
        stack = [key, value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                if not is_utf8(item):
                    param = key if item is not key and is_utf8(key) else None
                    raise ApiError(400, f"{'a field name' if param is None else repr(param)} contains a lone "
                                   "UTF-16 surrogate (\\ud800-\\udfff without its pair), which is no character",
                                   param=param)
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())


def parse_completion(raw: bytes, *, tokenizer, model_name: str, max_model_len: int, vocab_size: int,
                     max_prompts: int = MAX_PROMPTS) -> Completion:
    """A /v1/completions body -> Completion, or ApiError (4xx) naming the problem. max_prompts: the most
    prompts one request may hold (the server passes what its queue can ever take, if less than 64)."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, or an integer of 4300+ digits
        raise ApiError(400, f"request body is not valid JSON ({getattr(e, 'msg', None) or one_line(e)})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    _check_unicode(body)
    model = body.get("model")
    if model is None:
        raise ApiError(400, "'model' is required", param="model")
    if model != model_name:
        raise ApiError(404, f"the model '{str(model)[:100]}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    n = _field(body, "n", (int,), 1, what="an integer")
    if n != 1:
        raise ApiError(400, f"only n=1 is supported, got n={n}", param="n")
    best_of = _field(body, "best_of", (int,), 1, what="an integer")
    if best_of != 1:
        raise ApiError(400, f"only best_of=1 is supported, got {best_of}", param="best_of")
    if body.get("suffix") is not None:
        raise ApiError(400, "'suffix' is not supported", param="suffix")
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", param="prompt")
    prompts, texts = _prompts(body["prompt"], tokenizer, vocab_size, max_prompts)
    max_tokens = _field(body, "max_tokens", (int,), 16, check=lambda v: 0 <= v <= max_model_len,
                        what=f"an integer in [0, {max_model_len}] (max_model_len)")
    echo = _field(body, "echo", (bool,), False, what="true or false")
    logprobs = _field(body, "logprobs", (int,), None, check=lambda v: 0 <= v <= TOP_LOGPROBS,
                      what=f"an integer in [0, {TOP_LOGPROBS}]")
    if max_tokens == 0 and not echo:
        raise ApiError(400, "max_tokens=0 needs echo=true (prompt log-probabilities)", param="max_tokens")
    for p in prompts:
        if len(p) > max_model_len:
            raise ApiError(400, f"the prompt has {len(p)} tokens, more than max_model_len={max_model_len}",
                           param="prompt", code="context_length_exceeded")
        if len(p) + max_tokens > max_model_len:
            raise ApiError(400, f"the prompt has {len(p)} tokens; with max_tokens={max_tokens} that exceeds "
                           f"max_model_len={max_model_len}", param="max_tokens", code="context_length_exceeded")
    temperature = float(_field(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2,
                               what="a number in [0, 2]"))
    top_p = float(_field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, what="a number in (0, 1]"))
    top_k = _field(body, "top_k", (int,), 0, check=lambda v: -1 <= v <= vocab_size,
                   what=f"an integer in [-1, {vocab_size}] (the vocabulary size; 0 or -1: off)")
    seed = _field(body, "seed", (int,), None, check=lambda v: -(2**63) <= v < 2**64,
                  what="an integer in [-2^63, 2^64)")
    stream = _field(body, "stream", (bool,), False, what="true or false")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them",
                       param="stop")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       param="stream_options")
    usage = bool(options and options.get("include_usage"))
    return Completion(prompts, texts, max_tokens, temperature, top_p, max(top_k, 0), seed, tuple(stop), stream,
                      logprobs, echo, usage)


def _prompts(prompt, tokenizer, vocab_size, max_prompts=MAX_PROMPTS):
    def ids_ok(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        items = [prompt]
    elif ids_ok(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids_ok(p) for p in prompt):
        items = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids (a list of integers, or "
                       "a list of such lists), not empty", param="prompt")
    if len(items) > max_prompts:
        why = "" if max_prompts == MAX_PROMPTS else " (what the server's queue, --max-queue, can ever hold)"
        raise ApiError(400, f"at most {max_prompts} prompts per request{why}, got {len(items)}", param="prompt")
    ids, texts = [], []
    for p in items:
        if isinstance(p, str):
            ids.append(list(tokenizer(p)["input_ids"]))
            texts.append(p)
        else:
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is out of range [0, {vocab_size})", param="prompt")
            ids.append(list(p))
            texts.append(None)
        if not ids[-1]:
            raise ApiError(400, "a prompt is empty", param="prompt")
    return ids, texts


# -- responses ------------------------------------------------------------------------------------------


class _Tokens:
    """Token strings (decoded one by one, as OpenAI's logprobs lists them), cached."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = self.tokenizer.decode([i])
        return s


def _logprobs(tok: _Tokens, ids, lps, tops, k: int, offset: int, *, first_none: bool = False) -> dict:
    tokens = [tok(i) for i in ids]
    out = {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": [], "text_offset": []}
    for j, t in enumerate(tokens):
        out["text_offset"].append(offset)
        offset += len(t)
        if first_none and j == 0:
            out["top_logprobs"].append(None)
            continue
        alts = tops[j - 1 if first_none else j] if tops else []
        out["top_logprobs"].append({tok(a): float(lp) for a, lp in alts[:k]})
    if first_none:
        out["token_logprobs"] = [None] + out["token_logprobs"]
    return out


def _merge(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {key: a[key] + b[key] for key in a}


def _prompt_logprobs(tok, r: Request, k: int) -> dict:
    return _logprobs(tok, r.prompt, r.prompt_token_logprobs, r.prompt_top_logprobs, k, 0, first_none=True)


def _completion_logprobs(tok, r: Request, k: int, start: int, end: int, offset: int) -> dict:
    tops = r.top_logprobs[start:end] if k else [[] for _ in range(end - start)]
    return _logprobs(tok, r.tokens[start:end], r.token_logprobs[start:end], tops, k, offset)


def _echo_text(c: Completion, i: int, tok: _Tokens, r: Request) -> str:
    text = c.prompt_texts[i]
    return text if text is not None else tok.tokenizer.decode(r.prompt, skip_special_tokens=True)


def _answer(c: Completion, reqs, tok: _Tokens, head: dict) -> bytes:
    """The whole non-streamed answer, JSON-encoded (run in a worker thread: echo + logprobs over a long
    prompt is megabytes)."""
    choices = []
    for i, r in enumerate(reqs):
        echo, lp = _echo_text(c, i, tok, r) if c.echo else "", None
        text = echo + r.text
        if c.logprobs is not None:
            lp = _completion_logprobs(tok, r, c.logprobs, 0, len(r.tokens), len(echo))
            if c.echo:
                lp = _merge(_prompt_logprobs(tok, r, c.logprobs), lp)
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
    # Encoded choice by choice: json's C encoder holds the GIL for a whole call (0.2 s for 3.5 MB), which
    # would stall the event loop as surely as building the answer there.
    rest = json.dumps({**head, "usage": _usage(reqs)}, ensure_ascii=False)
    parts = [json.dumps(choice, ensure_ascii=False) for choice in choices]
    return f'{rest[:-1]}, "choices": [{", ".join(parts)}]}}'.encode()


def _usage(reqs) -> dict:
    prompt_tokens, completion_tokens = sum(len(r.prompt) for r in reqs), sum(len(r.tokens) for r in reqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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
    tok = _Tokens(tokenizer)
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
                               ("kv_cache_bytes", "KV cache size")):
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
        return Response(await asyncio.to_thread(_answer, c, reqs, tok, head), media_type="application/json")

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


def _echo_chunk(chunk, c: Completion, i: int, tok: _Tokens, r: Request) -> str:
    return chunk(i, _echo_text(c, i, tok, r), _prompt_logprobs(tok, r, c.logprobs), None)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(reqs, updates: asyncio.Queue, c: Completion, tok: _Tokens, head: dict):
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
            yield chunk(i, _echo_text(c, i, tok, r), None, None)
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
            lp = _completion_logprobs(tok, r, c.logprobs, sent_tokens[i], n, sent_text[i])
            sent_tokens[i] = n
        sent_text[i] += len(delta)
        done[i] = finish is not None
        yield chunk(i, delta, lp, finish)
    if all(done) and c.include_usage:  # OpenAI's stream_options: one more chunk, no choices, the token counts
        yield _event({**head, "choices": [], "usage": _usage(reqs)})
    yield "data: [DONE]\n\n"
