"""The /v1/completions request and answer, without HTTP: `parse_completion` (a body's validation into a
`Completion`), `prompt_token_lists`, and the builders of the JSON answer (`answer`, `usage`, the logprobs
blocks) that inference/server.py sends or streams.

Bodies are never trusted: size-limited (the door counts bytes while they arrive), UTF-8 checked, JSON
checked without NaN/Infinity literals, lone UTF-16 surrogates refused, every field type- and range-checked;
each failure is an `ApiError` (400) naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from inference.engine import TOP_LOGPROBS, Request
from inference.serve_door import MAX_BODY_BYTES, ApiError, one_line
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


class Tokens:
    """Token strings (decoded one by one, as OpenAI's logprobs lists them), cached."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = self.tokenizer.decode([i])
        return s


def _logprobs(tok: Tokens, ids, lps, tops, k: int, offset: int, *, first_none: bool = False) -> dict:
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


def prompt_logprobs_of(tok, r: Request, k: int) -> dict:
    return _logprobs(tok, r.prompt, r.prompt_token_logprobs, r.prompt_top_logprobs, k, 0, first_none=True)


def completion_logprobs(tok, r: Request, k: int, start: int, end: int, offset: int) -> dict:
    tops = r.top_logprobs[start:end] if k else [[] for _ in range(end - start)]
    return _logprobs(tok, r.tokens[start:end], r.token_logprobs[start:end], tops, k, offset)


def echo_text(c: Completion, i: int, tok: Tokens, r: Request) -> str:
    text = c.prompt_texts[i]
    return text if text is not None else tok.tokenizer.decode(r.prompt, skip_special_tokens=True)


def answer(c: Completion, reqs, tok: Tokens, head: dict) -> bytes:
    """The whole non-streamed answer, JSON-encoded (run in a worker thread: echo + logprobs over a long
    prompt is megabytes)."""
    choices = []
    for i, r in enumerate(reqs):
        echo, lp = echo_text(c, i, tok, r) if c.echo else "", None
        text = echo + r.text
        if c.logprobs is not None:
            lp = completion_logprobs(tok, r, c.logprobs, 0, len(r.tokens), len(echo))
            if c.echo:
                lp = _merge(prompt_logprobs_of(tok, r, c.logprobs), lp)
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
    # Encoded choice by choice: json's C encoder holds the GIL for a whole call (0.2 s for 3.5 MB), which
    # would stall the event loop as surely as building the answer there.
    rest = json.dumps({**head, "usage": usage(reqs)}, ensure_ascii=False)
    parts = [json.dumps(choice, ensure_ascii=False) for choice in choices]
    return f'{rest[:-1]}, "choices": [{", ".join(parts)}]}}'.encode()


def usage(reqs) -> dict:
    prompt_tokens, completion_tokens = sum(len(r.prompt) for r in reqs), sum(len(r.tokens) for r in reqs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
