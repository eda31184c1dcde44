"""A request to the engine and what it produced: `Request`, the checks that refuse what could never be
served (`check_request`), the stop checks run on each new token (`stop_reason`), and `one_line` (an
exception as the one line a client or log gets).

The engine's errors live here too (`EngineError`, `EngineFull`, `EngineStopped`): the request's checks
raise the first, and every caller of the engine catches them by these names.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from inference.generate import GenerateError

TOP_LOGPROBS = 5  # alternatives computed per token (OpenAI's completions API allows at most 5)
INT32 = 2**31


class EngineError(GenerateError):
    """A request the engine cannot take (the message says why, in one line)."""


class EngineFull(EngineError):
    """The queue is at its bound: try again later (the server answers 429)."""


class EngineStopped(EngineError):
    """The background loop stopped on a fatal error (`Engine.fatal`): no request is taken (the server
    answers 503)."""


@dataclass(eq=False)
class Request:
    prompt: Sequence[int]
    max_tokens: int = 16
    stop_ids: frozenset = frozenset()  # token ids that end the completion (kept in it unless special)
    stop_strings: tuple = ()  # strings that end it (cut before the string)
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stream_id: int = 0  # sampling key = fold_in(fold_in(key(seed), stream_id), token index)
    logprobs: int = 0  # top alternatives to keep per generated token (chosen-token logprobs: always)
    prompt_logprobs: bool = False
    on_update: Callable | None = None  # called after each new token and when finished
    incremental: bool = False  # keep `text` current after every token (streaming)
    # results
    tokens: list = field(default_factory=list)
    token_logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)  # per token: [(id, logprob), ...]
    prompt_token_logprobs: list = field(default_factory=list)  # for prompt[1:]
    prompt_top_logprobs: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None  # with finish_reason "error": why, in one line (what the server reports)
    cancelled: bool = False
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _checked: int = 0  # text length already searched for stop strings
    _cut: bool = False  # text was cut at a stop string
    _seq: object = None  # the scheduler's sequence, once the engine has handed it over

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def stable_text(self) -> str:
        """The part of `text` that can no longer change: without a trailing incomplete character and,
        while running with stop strings, without the tail that could still start one."""
        text = self.text
        if self.finished:
            return text
        text = text.rstrip("\ufffd")
        hold = max((len(s) for s in self.stop_strings), default=1) - 1
        return text[: max(len(text) - hold, 0)] if hold else text


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _integer(value, name: str, low: int, high: int) -> None:
    """Refuses (EngineError) a Request field that is not an integer in [low, high)."""
    try:
        number = operator.index(value)
    except TypeError:
        raise EngineError(f"{name} must be an integer, got {value!r}") from None
    if not low <= number < high:
        raise EngineError(f"{name}={number} is out of range [{low}, {high})")


def _number(value, name: str, low: float, high: float, *, open_low: bool = False) -> None:
    """Refuses a Request field that is not a finite number in [low, high] ((low, high] if open_low)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise EngineError(f"{name} must be a number, got {value!r}")
    ok = math.isfinite(value) and (low < value if open_low else low <= value) and value <= high
    if not ok:
        raise EngineError(f"{name}={value} is out of range {'(' if open_low else '['}{low}, {high}]")


def check_request(request: Request, *, vocab: int, max_model_len: int, can_decode: bool) -> None:
    """Refuses (EngineError) what could never be served, every numeric field included: the sampling
    fields go into int32 / float32 arrays on the engine's thread, so a value they cannot hold (top_k =
    2^40) is refused here, not raised there."""
    n = len(request.prompt)
    if n == 0:
        raise EngineError("the prompt is empty")
    _integer(request.max_tokens, "max_tokens", 0, INT32)
    if n + request.max_tokens > max_model_len:
        raise EngineError(f"the prompt has {n} tokens; with max_tokens={request.max_tokens} that exceeds "
                          f"max_model_len={max_model_len}")
    ids = np.asarray(request.prompt)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise EngineError("the prompt must be a list of token ids")
    bad = ids[(ids < 0) | (ids >= vocab)]
    if len(bad):
        raise EngineError(f"token id {bad[0]} is out of range [0, {vocab})")
    _number(request.temperature, "temperature", 0.0, float(np.finfo(np.float32).max))
    _integer(request.top_k, "top_k", 0, INT32)
    _number(request.top_p, "top_p", 0.0, 1.0, open_low=True)
    _integer(request.seed, "seed", -(2**63), 2**64)
    _integer(request.stream_id, "stream_id", 0, INT32)
    _integer(request.logprobs, "logprobs", 0, TOP_LOGPROBS + 1)
    if (request.stop_strings or request.incremental) and not can_decode:
        raise EngineError("stop strings and streaming need the engine's decode function (a tokenizer)")


def stop_reason(r: Request, token: int, decode: Callable | None) -> str | None:
    """Whether r's newest token (already appended) ends it: "stop" for a stop id or a stop string in the
    incrementally decoded text (as vLLM checks it: only the new tail, cut before the string), "length" at
    max_tokens, else None. Keeps `text` current when r streams or has stop strings."""
    if token in r.stop_ids:
        return "stop"
    if r.stop_strings or r.incremental:
        r.text = decode(r.tokens)
        if r.stop_strings:
            longest = max(len(s) for s in r.stop_strings)
            window = max(r._checked - longest, 0)
            hits = [p for p in (r.text.find(s, window) for s in r.stop_strings) if p >= 0]
            r._checked = len(r.text)
            if hits:
                r.text, r._cut = r.text[: min(hits)], True
                return "stop"
    return "length" if len(r.tokens) >= r.max_tokens else None
