"""The OpenAI-compatible HTTP server (`normistral serve`): a thin shell around `inference.engine.Engine`.

Inside: `create_app(engine, tokenizer, model_name)` (a FastAPI app), `parse_completion(body, ...)` (the
validation of a /v1/completions body), `ApiError`, and the response builders.

Endpoints:
- POST /v1/completions: prompt (a string, a list of strings, a list of token ids, or a list of those),
  max_tokens (default 16, 0 allowed with echo), temperature (default 1; 0 = greedy), top_p, top_k (0 or
  -1 = off), seed, stop (a string or up to 4), stream (server-sent events in OpenAI's chunk format,
  ending with `data: [DONE]`; stream_options.include_usage adds a usage chunk), logprobs (0-5
  alternatives), echo, n (only 1). echo + logprobs gives the
  prompt tokens' log-probabilities too (max_tokens=0: only those, what evaluation harnesses ask for).
- GET /v1/models, GET /health, GET /metrics (Prometheus text: queue depth, active slots, tokens/s, time to
  first token, counters).
- /v1/chat/completions answers 404 saying why (a base model has no chat template).
Every error is OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}) with a 4xx status
(5xx only for a server fault); the engine keeps running whatever a request holds. Bodies are parsed by
hand (size-limited, UTF-8 checked, JSON checked, every field type-checked), never trusted.
Overload: a full engine queue answers 429. A client that disconnects (streaming or not) cancels its
request, which frees its slot at the engine's next step.

The engine steps in its own thread (started by the caller: `engine.start()`); each request's `on_update`
(called there) posts a snapshot to the request's asyncio queue with `loop.call_soon_threadsafe`, so the
event loop never blocks on the device.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.engine import TOP_LOGPROBS, Engine, EngineError, EngineFull, Request

MAX_BODY_BYTES = 4 << 20
MAX_STOP = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
    if not ok or (check is not None and not check(value)):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


def parse_completion(raw: bytes, *, tokenizer, model_name: str, max_model_len: int, vocab_size: int) -> Completion:
    """A /v1/completions body -> Completion, or ApiError (4xx) naming the problem."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON ({getattr(e, 'msg', 'too deeply nested')})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
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
    prompts, texts = _prompts(body["prompt"], tokenizer, vocab_size)
    max_tokens = _field(body, "max_tokens", (int,), 16, check=lambda v: v >= 0, what="an integer >= 0")
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
    top_k = _field(body, "top_k", (int,), 0, check=lambda v: v >= -1, what="an integer >= -1")
    seed = _field(body, "seed", (int,), None, check=lambda v: -(2**63) <= v < 2**64, what="an integer")
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


def _prompts(prompt, tokenizer, vocab_size):
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
    if len(items) > 64:
        raise ApiError(400, f"at most 64 prompts per request, got {len(items)}", param="prompt")
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


def _error_response(e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)


# -- the app -----------------------------------------------------------------------------------------


def create_app(engine: Engine, tokenizer, model_name: str):
    app = FastAPI(title="normistral serve", docs_url=None, redoc_url=None, openapi_url=None)
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
        if engine._thread is None or not engine._thread.is_alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
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
        length = http.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        c = parse_completion(await http.body(), tokenizer=tokenizer, model_name=model_name,
                             max_model_len=engine.max_model_len, vocab_size=config.vocab_size)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        seed = c.seed if c.seed is not None else secrets.randbits(31)
        eos = frozenset() if tokenizer.eos_token_id is None else frozenset({int(tokenizer.eos_token_id)})
        reqs = []
        for i, ids in enumerate(c.prompts):
            def post(r, i=i):  # engine thread -> event loop
                snapshot = (i, len(r.tokens), r.stable_text() if r.incremental else "", r.finish_reason)
                loop.call_soon_threadsafe(updates.put_nowait, snapshot)

            reqs.append(Request(ids, max_tokens=c.max_tokens, stop_ids=eos, stop_strings=c.stop,
                                temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, seed=seed, stream_id=i,
                                logprobs=c.logprobs or 0,
                                prompt_logprobs=c.echo and c.logprobs is not None, on_update=post,
                                incremental=c.stream))
        submitted = []
        try:
            for r in reqs:
                engine.submit(r)
                submitted.append(r)
        except EngineFull as e:
            for r in submitted:
                engine.cancel(r)
            raise ApiError(429, f"server overloaded: {e}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except EngineError as e:
            for r in submitted:
                engine.cancel(r)
            raise ApiError(400, str(e)) from None
        rid = f"cmpl-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        if c.stream:
            return StreamingResponse(_stream(engine, reqs, updates, c, tok, head),
                                     media_type="text/event-stream")
        try:
            while not all(r.finished for r in reqs):
                try:
                    await asyncio.wait_for(updates.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():  # the client went away: free the slots
                        raise ApiError(400, "client disconnected") from None
        finally:
            for r in reqs:
                if not r.finished:
                    engine.cancel(r)
        choices = []
        for i, r in enumerate(reqs):
            text, lp = r.text, None
            if c.echo:
                text = _echo_text(c, i, tok, r) + text
            if c.logprobs is not None:
                offset = len(_echo_text(c, i, tok, r)) if c.echo else 0
                lp = _completion_logprobs(tok, r, c.logprobs, 0, len(r.tokens), offset)
                if c.echo:
                    lp = _merge(_prompt_logprobs(tok, r, c.logprobs), lp)
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
        prompt_tokens = sum(len(r.prompt) for r in reqs)
        completion_tokens = sum(len(r.tokens) for r in reqs)
        return {**head, "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                                      "completion_tokens": completion_tokens,
                                                      "total_tokens": prompt_tokens + completion_tokens}}

    return app


async def _stream(engine: Engine, reqs, updates: asyncio.Queue, c: Completion, tok: _Tokens, head: dict):
    """Server-sent events: text deltas (with their tokens' logprobs), a final chunk per prompt with its
    finish_reason, then [DONE]. Cancelled requests (a client that went away) free their slots."""

    def chunk(i, text, lp, finish):
        body = {**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    sent_text = [0] * len(reqs)
    sent_tokens = [0] * len(reqs)
    done = [False] * len(reqs)
    try:
        if c.echo:
            for i, r in enumerate(reqs):
                echo = _echo_text(c, i, tok, r)
                lp = None
                if c.logprobs is not None:
                    while r._prefilled < len(r.prompt) and not r.finished:  # prompt logprobs come with prefill
                        await asyncio.sleep(0.005)
                    lp = _prompt_logprobs(tok, r, c.logprobs)
                yield chunk(i, echo, lp, None)
        while not all(done):
            # A client that goes away cancels this generator (Starlette watches the connection while it
            # streams); the `finally` below then frees the slots.
            i, n, text, finish = await updates.get()
            if done[i]:
                continue
            r = reqs[i]
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
            if finish is not None:
                done[i] = True
            yield chunk(i, delta, lp, finish)
        if c.include_usage:  # OpenAI's stream_options: one more chunk, no choices, the token counts
            prompt_tokens, completion_tokens = sum(len(r.prompt) for r in reqs), sum(len(r.tokens) for r in reqs)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for r in reqs:
            if not r.finished:
                engine.cancel(r)
