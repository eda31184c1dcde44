"""The inference engine: continuous batching over a fixed set of decode slots.

Inside: `Request` (one prompt, its limits and sampling, and what it produced), `Engine` (`submit`,
`cancel`, `step`, `run`, `start` / `stop` for a background thread, `warmup`, `metrics`), `EngineError`,
`EngineFull`, `EngineStopped`, `cache_length` (max_model_len rounded as the cache holds it), the compile
counter (`Engine.compiles`, fed by one process-wide `jax.monitoring` listener), the device steps
`_packed_prefill_step` / `_prefill_step` / `_decode_step` (pure functions), `cache_format` and
`engine_steps` (their jitted forms with the cache in one fixed format, what the engine runs and what
`compile-check` compiles).

How it runs. The engine owns one KV cache of `slots` rows, each a contiguous row of S = max_model_len
slots (memory: slots x S x layers x 2 x kv heads x head_dim x bytes, accounted by `cache_bytes`). A row
is free, prefilling, or decoding, and keeps its own length (its write index and RoPE position), so rows
at different lengths share one step (the model's forward with a per-row `write_index`, ragged). Each
`step()` is, on the host:
1. admit: queued requests take free slots (FIFO);
2. prefill: one call sends prefilling rows' next chunks (at most `prefill_chunk` tokens each; a long
   prompt goes in over several steps, so it never stalls the decoding rows for its whole prefill),
   written in place in the whole cache (the forward's `cache_rows`: each token goes to its own cache
   row and slot; no copy of the rows' cache is made). Prompts' first chunks are PACKED into one row, as
   vLLM packs a step's tokens (`_packed_prefill_step`): up to `prefill_rows` prompts and `prefill_chunk`
   tokens, each attending over its own tokens alone (the forward's "fresh" mode with packed segment
   ids), so a call costs its real tokens rounded up to one width of the `prefill_width` ladder (16, 24,
   32, 48, 64, ...), whatever the prompts' lengths. When every prompt of a call has at most
   PROMPT_WINDOW tokens, attention runs as that sliding window (`prompt_window`: exact for them), which
   visits a band of keys per query block instead of the whole packed row. A long prompt's later chunks
   go one per call at `prefill_chunk` width and attend over key blocks of their row's filled slots. A
   row whose prompt is complete gets its first token from that call. While other rows decode and more
   requests queue, the call waits (at most `max_prefill_wait` steps) until `prefill_batch` rows are
   ready: one call for several rows costs about what one call for one row costs;
3. decode: one token for every decoding row in one call, the rows this prefill completes included (fed
   their first token on the device); inactive rows write nowhere (their write index is S, past the
   end, and scatters drop it), and no row is computed past its max_tokens;
4. read: with `overlap` (the default), the PREVIOUS decode call's tokens are read now, while the device
   runs this step's calls, then this prefill's: the host's reading, stop checks, streaming callbacks
   and the next step's admission and call building overlap the device's work, which always has the
   next decode queued. Each token is checked on the host: a stop token id, a stop string in the
   incrementally decoded text (as vLLM does), max_tokens, or a cancel frees the slot in the step that
   reads it. The price of reading one step late: a row that stops on a stop token or string has one
   more token computed (discarded) and its slot refilled a step later. `overlap=False` reads each
   decode call in its own step (host and device alternate).
Shapes are bucketed so a running engine does not recompile: decode has one shape ([slots]); packed
prefill one per width of the `prefill_width` ladder up to prefill_chunk (always `prefill_rows` prompt
entries), and a banded one per width where `prompt_window` applies; later chunks one ([1, prefill_chunk]).
Prompt log-probabilities (full logits for every position) double the prefill programs. Sampling and the
sort for top-logprob alternatives are run-time flags (a `cond`: they run only in calls where a row asks for
them, no second program), so a greedy workload never pays for them. `warmup()` compiles every program a
request can select up front, and `compiles` counts the XLA compilations of steps and warm-up (none after
it: a compile in a running server would stall every stream). The
steps take the graphdef closed over and the state as its flat list of leaves (`_bound`): per call, jit
hashes a few flags instead of a model graph. On CPU, give the engine a model whose layer stack is split
(`jaxmodel.model.unstack_layers`, as `Generator` loads it there): XLA CPU copies a stacked layer's
weights out of the stack in every call; with such a model the cache is per layer too (one array per
layer, `init_cache(per_layer=True)`), so no layer's cache is sliced out either.
Completions are decoded with `skip_special_tokens`, so an EOS stop never shows as `</s>`.

The cache's memory layout: it crosses the jit boundary at every step (a serving loop cannot live inside
one program), and on TPU the compiler keeps a cache in its own tiled layout, not row-major. A cache in
the default layout would be copied whole around every step (+1 cache of temporaries, measured by
compile-check). So the engine asks the compiler once which format the decode step wants for the cache
(`cache_format`: the step compiled with `Layout.AUTO` for it), puts the cache in that format, and
compiles both steps with that format fixed for the cache in and out (`engine_steps`): the donated cache
stays in place, in the compiler's layout, from step to step. On CPU the chosen layout is the default.

Logprobs: every generated token's log-probability under the model (log-softmax of the float32 logits,
before temperature, as OpenAI and vLLM report it) and the top `top_logprobs` alternatives; with
`prompt_logprobs`, the same for every prompt token after the first (what evaluation harnesses ask of
`echo` + `logprobs`).

Threading: `submit` / `cancel` may be called from any thread; `step` from one thread only (the caller's
for offline use, or the engine's own after `start()`). `Request.on_update` is called from that thread.

Failures. `check` (called by `submit`) refuses with EngineError what could never be served, every numeric
field included (a value the engine's int32 / float32 arrays cannot hold, such as top_k = 2^40, never
reaches its thread). A request that fails in the loop all the same (changed after `submit`, or its decode
function or `on_update` callback raises) is finished alone with finish_reason "error" and `Request.error`
(one line) and the engine goes on. Anything else that escapes a step (a device error) stops the background
loop: every queued and running request is finished with "error", `fatal` keeps the exception, `submit`
refuses from then on, and `on_fatal(e)` is called from the engine's thread (the server exits then).

Metrics take fixed memory: tokens/s from a ring of 0.1 s buckets over the last 10 s, TTFT from the last
1000 requests, whether or not anyone reads them.

Shape letters: B slots, P prefill rows, C chunk length, V vocab, S cache slots per row.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import operator
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout

from inference.generate import GenerateError, _batch_split, _mesh_of, _split, bucket_batch, greedy, sample_rows
from inference.kv_cache import KVCache, init_cache
from jaxmodel.attention import bands

FREE, PREFILL, DECODE = 0, 1, 2
TOP_LOGPROBS = 5  # alternatives computed per token (OpenAI's completions API allows at most 5)
PREFILL_ROWS = 8  # prompts per packed prefill call, by default
PROMPT_WINDOW = 64  # packed prompts up to this long attend over a band of keys (`prompt_window`)
SAMPLE = True  # the engine's steps can sample (`_pick`: only in calls where a row does; one program for both)
RATE_WINDOW, RATE_BUCKETS = 10.0, 100  # tokens/s over the last 10 s, counted in 0.1 s buckets (fixed memory)
INT32 = 2**31


def _host(x) -> np.ndarray:
    """A step output on the host; on a mesh spanning processes (every process runs the same schedule),
    gathered from all of them."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

class EngineError(GenerateError):
    """A request the engine cannot take (the message says why, in one line)."""


class EngineFull(EngineError):
    """The queue is at its bound: try again later (the server answers 429)."""


class EngineStopped(EngineError):
    """The background loop stopped on a fatal error (`Engine.fatal`): no request is taken (the server
    answers 503)."""


def cache_length(max_model_len: int) -> int:
    """The cache slots per row for max_model_len: rounded up to a multiple of 16."""
    return -(-max_model_len // 16) * 16


# -- compile counting ----------------------------------------------------------------------------------

_COMPILING = threading.local()  # .engine: the engine whose step or warm-up runs in this thread
_LISTENING = threading.Lock()
_listener_registered = False


def _on_duration_event(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        engine = getattr(_COMPILING, "engine", None)
        if engine is not None:
            engine.compiles += 1


def _listen_for_compiles() -> None:
    """Registers, once per process, the listener that counts XLA compilations into the engine whose step
    or warm-up runs in the compiling thread (jax.monitoring's listeners are global: one per engine would
    pile up and count every engine's compiles in each)."""
    global _listener_registered
    with _LISTENING:
        if not _listener_registered:
            jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
            _listener_registered = True


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
    _prefilled: int = 0
    _checked: int = 0
    _cut: bool = False  # text was cut at a stop string

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


def _one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def prompt_window(counts, width: int) -> int | None:
    """The packed call's `window`: PROMPT_WINDOW when each of its prompts (token counts) fits it and
    attention over a row of `width` runs banded then (else None: the whole row, masked)."""
    return PROMPT_WINDOW if max(counts) <= PROMPT_WINDOW and bands(PROMPT_WINDOW, width) else None


def prefill_width(n: int, chunk: int) -> int:
    """The padded width of a prefill chunk of n tokens: 16, 24, 32, 48, 64, 96, 128, ... (2^k and
    1.5 x 2^k: a row is at most a third padding, where powers of two alone allow half), at most `chunk`."""
    if n <= 16:
        return min(16, chunk)
    power = 1 << (n - 1).bit_length()
    return min(power * 3 // 4 if power * 3 // 4 >= n else power, chunk)


# -- device steps --------------------------------------------------------------------------------------


def _top(logp, want):
    """The TOP_LOGPROBS best (logprobs, ids) along the last axis, or zeros unless `want` (a run-time
    flag: the sort over the vocabulary runs only for calls where a row asks for alternatives)."""
    shape = logp.shape[:-1] + (TOP_LOGPROBS,)
    return jax.lax.cond(want, lambda: tuple(jax.lax.top_k(logp, TOP_LOGPROBS)),
                        lambda: (jnp.zeros(shape, logp.dtype), jnp.zeros(shape, jnp.int32)))


def _pick(logits, sample: bool, temperature, top_k, top_p, seeds, streams, steps, want_top):
    """Next tokens [B] from float32 logits [B, V], with their log-probabilities and the top alternatives
    (zeros unless want_top). sample (static): whether the program can sample at all; if so it samples
    only in calls where a row asks (temperature > 0, a run-time `cond`: a greedy call never runs the sort
    over the vocabulary), so one program serves greedy and sampled calls (the engine's: sample=True)."""
    token = greedy(logits)
    if sample:
        def sampled():
            keys = jax.vmap(lambda s, r, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), t))(
                seeds, streams, steps)
            return jnp.where(temperature > 0, sample_rows(logits, keys, temperature, top_k, top_p), token)

        token = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: token)
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    return token, chosen, *_top(logp, want_top)


def _decode_step(graphdef, sample, state, cache: KVCache, tokens, fresh_tokens, fresh, active, temperature, top_k,
                 top_p, seeds, streams, steps, want_top):
    """One token for every active row [B] at its own slot (its length) -> (token, logprob, top logprobs,
    top ids (zeros unless want_top), cache). The input token of row b is fresh_tokens[b] where fresh[b]
    (a row whose prompt the prefill call just before completed: its first token, still on the device),
    else tokens[b] (the previous decode call's output, still on the device). Inactive rows write at
    slot S: nowhere."""
    model = nnx.merge(graphdef, state)
    tokens = jnp.where(fresh, fresh_tokens, tokens)
    write = jnp.where(active, cache.lengths, cache.max_length)
    logits, cache = model(tokens[:, None], cache.lengths[:, None], active[:, None].astype(jnp.int32), cache=cache,
                          write_index=write, last_only=True)
    return (*_pick(logits[:, 0], sample, temperature, top_k, top_p, seeds, streams, steps, want_top), cache)


def _prefill_step(graphdef, sample, prompt_lp, state, cache: KVCache, rows, ids, mask, start, targets,
                  temperature, top_k, top_p, seeds, streams, want_top):
    """Long prompts' later chunks ids [P, C] (right-padded, mask 1 = real) of the rows `rows` [P] (B past
    the end = a padding row), each written at its own offset `start` [P], in place in the whole cache
    (the model's `cache_rows`: no gathered copy of the rows' cache), attending over key blocks up to the
    last filled slot (online softmax: [P, K, G, C, block] scores at a time, not [P, K, G, C, S]) ->
    (first-token outputs as `_decode_step`, prompt logprobs of `targets` [P, C] and their top
    alternatives (zeros unless prompt_lp), the first tokens per cache row [B] (what the next decode call
    reads for these rows), cache)."""
    model = nnx.merge(graphdef, state)
    length = ids.shape[1]
    positions = start[:, None] + jnp.arange(length, dtype=jnp.int32)
    last = jnp.maximum(mask.sum(-1) - 1, 0)
    kw = dict(cache=cache, write_index=start, cache_rows=rows, cache_attention="blocked")
    if prompt_lp:
        logits, cache = model(ids, positions, mask, **kw)
        final = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    else:
        logits, cache = model(ids, positions, mask, logits_at=last, **kw)
        final = logits[:, 0]
    return _first_outputs(logits, final, prompt_lp, targets, rows, cache, sample, temperature, top_k, top_p,
                          seeds, streams, want_top)


def _packed_prefill_step(graphdef, sample, prompt_lp, window, state, cache: KVCache, rows, ends, ids, segments,
                         positions, targets, temperature, top_k, top_p, seeds, streams, want_top):
    """The first chunks of up to P prompts packed in one row of W tokens, as vLLM packs a step's tokens:
    ids / segments / positions / targets [W] (token t belongs to prompt segments[t] - 1, 0 = padding, at
    RoPE position and cache slot positions[t]; targets: the next prompt token) for the cache rows `rows`
    [P] (B past the end = a padding prompt), prompt p's last token at ends[p]. Each prompt attends over
    its own tokens alone (the forward's "fresh" mode with packed segment ids), so a call costs its real
    tokens rounded up to one width, whatever the prompts' lengths: no row of padding beside a long prompt.
    The prompts' cache rows are reset first. -> as `_prefill_step`, prompt logprobs [W] in the packed
    order. window (static): None, or PROMPT_WINDOW when every packed prompt is at most that long
    (attention then runs as that sliding window: exact for them, and a band of keys per query block
    instead of the whole row; see `jaxmodel.attention.xla_attention`)."""
    model = nnx.merge(graphdef, state)
    cache = cache._replace(segment_ids=cache.segment_ids.at[rows].set(0, mode="drop"),
                           lengths=cache.lengths.at[rows].set(0, mode="drop"))
    token_rows = jnp.where(segments > 0, jnp.take(rows, segments - 1, mode="clip"), cache.batch_size)
    kw = dict(cache=cache, write_index=positions[None], cache_rows=token_rows[None], cache_attention="fresh",
              prompt_window=window)
    if prompt_lp:
        logits, cache = model(ids[None], positions[None], segments[None], **kw)
        final = logits[0, ends]
    else:
        logits, cache = model(ids[None], positions[None], segments[None], logits_at=ends[None], **kw)
        final = logits[0]
    return _first_outputs(logits[0], final, prompt_lp, targets, rows, cache, sample, temperature, top_k, top_p,
                          seeds, streams, want_top)


def _first_outputs(logits, final, prompt_lp: bool, targets, rows, cache, sample, temperature, top_k, top_p, seeds,
                   streams, want_top):
    """A prefill call's outputs: the first tokens of final [P, V] (as `_decode_step`), the log-probabilities
    of `targets` [..., C] under logits [..., C, V] and their top alternatives (zeros unless prompt_lp),
    the first tokens per cache row [B], cache."""
    if prompt_lp:
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        p_top_lp, p_top_ids = _top(logp, want_top)
    else:
        target_lp = jnp.zeros(targets.shape, jnp.float32)
        p_top_lp = jnp.zeros(targets.shape + (TOP_LOGPROBS,), jnp.float32)
        p_top_ids = jnp.zeros(targets.shape + (TOP_LOGPROBS,), jnp.int32)
    out = _pick(final, sample, temperature, top_k, top_p, seeds, streams, jnp.zeros_like(seeds), want_top)
    first = jnp.zeros((cache.batch_size,), jnp.int32).at[rows].set(out[0], mode="drop")  # per cache row
    return (*out, target_lp, p_top_lp, p_top_ids, first, cache)


DECODE_STATIC, DECODE_DYNAMIC, DECODE_OUTPUTS = 2, 13, 4  # (graphdef, sample); state, cache, 10 vectors, want_top
PREFILL_STATIC, PREFILL_DYNAMIC, PREFILL_OUTPUTS = 3, 13, 8  # (graphdef, sample, prompt_lp); state, cache, ...
PACKED_STATIC = 4  # (graphdef, sample, prompt_lp, window)
PACKED_DYNAMIC = 14  # state, cache, rows, ends, ids, segments, positions, targets, 5 sampling vectors, want_top
_FORMATS: dict = {}


def _abstract(tree):
    return tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(tree))


def cache_format(graphdef, state, cache: KVCache, slots: int) -> KVCache:
    """The format (layout + sharding) per cache leaf that the decode step prefers: the step compiled once
    with `Layout.AUTO` for the cache in and out (remembered per model and cache shape). `state` and
    `cache` may be arrays or `jax.ShapeDtypeStruct`s with shardings (AOT)."""
    key = (graphdef, _abstract(state), _abstract(cache), slots)
    if key not in _FORMATS:
        auto = jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding), cache)
        cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), cache)
        step = jax.jit(_decode_step, static_argnums=(0, 1), donate_argnums=(3,),
                       in_shardings=(None, auto) + (None,) * (DECODE_DYNAMIC - 2),
                       out_shardings=Format(Layout.AUTO))  # all AUTO: donation pairs buffers by shape
        vec = lambda dt: jax.ShapeDtypeStruct((slots,), dt)  # noqa: E731
        exe = step.lower(graphdef, SAMPLE, state, cache, vec(jnp.int32), vec(jnp.int32), vec(jnp.bool_),
                         vec(jnp.bool_), vec(jnp.float32),
                         vec(jnp.int32), vec(jnp.float32), vec(jnp.int32), vec(jnp.int32), vec(jnp.int32),
                         jax.ShapeDtypeStruct((), jnp.bool_)).compile()
        _FORMATS[key] = exe.input_formats[0][1]
    return _FORMATS[key]


def _bound(fn, graphdef, treedef, flags: int):
    """fn(graphdef, *flags, state, ...) as step(*flags, leaves, ...): the graphdef closed over and the
    state passed as its flat list of leaves. Per call, jit then hashes a few booleans and flattens a list
    in C++, instead of hashing a graphdef and flattening an `nnx.State` in Python (~2 ms a call here: a
    tiny model's whole decode step costs a few ms)."""
    def step(*args):
        return fn(graphdef, *args[:flags], jax.tree.unflatten(treedef, args[flags]), *args[flags + 1:])
    step.__name__ = fn.__name__
    return step


@functools.lru_cache(maxsize=16)
def engine_steps(formats: KVCache, graphdef, treedef) -> tuple[Callable, Callable, Callable]:
    """(decode, prefill, packed prefill): `_decode_step` / `_prefill_step` / `_packed_prefill_step` for the
    model `graphdef` and a state of structure `treedef`, jitted with the flags static, the state as its
    leaves (`_bound`), and the cache donated and in `formats` in and out (so it is never re-laid out
    between steps). Called as decode(sample, leaves, cache, ...), prefill(sample, prompt_lp, leaves,
    cache, ...) and packed(sample, prompt_lp, window, leaves, cache, ...)."""
    d_flags, p_flags, k_flags = DECODE_STATIC - 1, PREFILL_STATIC - 1, PACKED_STATIC - 1

    def jit(fn, flags, dynamic, outputs):
        return jax.jit(_bound(fn, graphdef, treedef, flags), static_argnums=tuple(range(flags)),
                       donate_argnums=(flags + 1,), in_shardings=(None, formats) + (None,) * (dynamic - 2),
                       out_shardings=(None,) * outputs + (formats,))

    return (jit(_decode_step, d_flags, DECODE_DYNAMIC, DECODE_OUTPUTS),
            jit(_prefill_step, p_flags, PREFILL_DYNAMIC, PREFILL_OUTPUTS),
            jit(_packed_prefill_step, k_flags, PACKED_DYNAMIC, PREFILL_OUTPUTS))


# -- the engine ------------------------------------------------------------------------------------------


class Engine:
    def __init__(self, model, *, slots: int = 8, max_model_len: int | None = None, kv_cache_dtype: str | None = None,
                 prefill_chunk: int = 256, prefill_rows: int = PREFILL_ROWS, prefill_batch: int | None = None,
                 max_prefill_wait: int = 4, max_queue: int = 1024, decode: Callable[[list[int]], str] | None = None,
                 overlap: bool = True, on_fatal: Callable[[BaseException], None] | None = None):
        """model: an `nnx.Module` or its (graphdef, state) (int8 `QArray` weights work as they are).
        prefill_batch / max_prefill_wait: while other rows decode and more requests are queued, a prefill
        call waits until `prefill_batch` rows (default: a quarter of the slots, at most `prefill_rows`) are
        ready to prefill, for at most `max_prefill_wait` steps (one call for several new rows instead of
        one per step; with an empty queue a new row is prefilled at once).
        decode: token ids -> text (skipping special tokens); needed for stop strings and `text`.
        overlap: read each decode call's tokens one step late, while the device runs the next call (see
        `step`); False reads them in the step that made the call.
        on_fatal: called (from the engine's thread) with the exception that stopped the background loop,
        after every waiting and running request was finished with an error (see `_die`)."""
        self.graphdef, self.state = _split(model)
        merged = nnx.merge(self.graphdef, self.state)
        self.config = merged.config
        self.per_layer = merged.unstacked  # unstacked layers: a cache array per layer
        context = self.config.max_position_embeddings
        self.max_model_len = int(max_model_len or context)
        if not 1 <= self.max_model_len <= context:
            raise EngineError(f"max_model_len={max_model_len} must be in [1, {context}] (the model's context)")
        if slots < 1 or prefill_chunk < 1 or prefill_rows < 1 or (prefill_batch is not None and prefill_batch < 1):
            raise EngineError("slots, prefill_chunk, prefill_rows and prefill_batch must be positive")
        if max_prefill_wait < 0:
            raise EngineError(f"max_prefill_wait={max_prefill_wait} must be >= 0")
        self.mesh = _mesh_of(self.state)
        split = _batch_split(self.mesh)
        if slots % split:
            raise EngineError(f"slots={slots} must be a multiple of the mesh's batch split ({split})")
        self.slots, self.prefill_chunk = slots, prefill_chunk
        self.prefill_rows = min(bucket_batch(prefill_rows), bucket_batch(slots))
        self.prefill_batch = min(prefill_batch or max(1, slots // 4), self.prefill_rows)
        self.max_prefill_wait = max_prefill_wait
        self._prefill_waited = 0
        self.max_queue = max_queue
        self.decode = decode
        self.overlap = overlap
        self.kv_cache_dtype = kv_cache_dtype
        self.cache_length = cache_length(self.max_model_len)
        cache = self._call(init_cache, self.config, slots, self.cache_length, kv_dtype=kv_cache_dtype, mesh=self.mesh,
                           per_layer=self.per_layer)
        self.cache_formats = self._call(cache_format, self.graphdef, self.state, cache, slots)
        self.cache = jax.device_put(cache, self.cache_formats, donate=True)
        self.leaves, treedef = jax.tree.flatten(self.state)
        self._decode_step, self._prefill_step, self._packed_step = engine_steps(self.cache_formats,
                                                                                self.graphdef, treedef)
        self.cache_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(self.cache))
        # Host state per slot.
        self.requests: list[Request | None] = [None] * slots
        self.phase = np.zeros(slots, np.int32)
        self.dispatched = np.zeros(slots, np.int32)  # tokens per row produced or in flight
        self._tokens = np.zeros(slots, np.int32)  # the last decode call's tokens (on the device after the first)
        self._inflight = None  # (outputs, [(row, request)], want_top) of the decode call whose results are unread
        self.temperature = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.seeds = np.zeros(slots, np.int32)
        self.streams = np.zeros(slots, np.int32)
        self.queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        # Metrics.
        self.generated_tokens = 0
        self.finished_requests = 0
        self.aborted_requests = 0
        # Generated tokens per 0.1 s tick, a ring of the last RATE_WINDOW seconds: fixed memory however
        # long nobody reads the metrics (a list of every token's time grew ~64 bytes a token).
        self._rate_counts = [0] * RATE_BUCKETS
        self._rate_ticks = [-1] * RATE_BUCKETS  # the tick each bucket counts
        self.ttft: collections.deque = collections.deque(maxlen=1000)  # the last 1000 requests' TTFT
        self.decode_steps = 0
        self.prefill_calls = 0
        self.prefill_tokens = 0  # computed, padding included: the width of every prefill call (one row)
        self.compiles = 0  # XLA compilations in this engine's steps and warm-up
        self.failed_requests = 0  # finished with finish_reason "error"
        self.on_fatal = on_fatal
        self.fatal: BaseException | None = None  # what stopped the background loop
        _listen_for_compiles()

    # -- requests ---------------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Refuses (EngineError) what could never be served; called by `submit`."""
        n, vocab = len(request.prompt), self.config.vocab_size
        if n == 0:
            raise EngineError("the prompt is empty")
        _integer(request.max_tokens, "max_tokens", 0, INT32)
        if n + request.max_tokens > self.max_model_len:
            raise EngineError(f"the prompt has {n} tokens; with max_tokens={request.max_tokens} that exceeds "
                              f"max_model_len={self.max_model_len}")
        ids = np.asarray(request.prompt)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise EngineError("the prompt must be a list of token ids")
        bad = ids[(ids < 0) | (ids >= vocab)]
        if len(bad):
            raise EngineError(f"token id {bad[0]} is out of range [0, {vocab})")
        # The sampling fields go into int32 / float32 arrays on the engine's thread: a value they cannot
        # hold must be refused here, not raise there.
        _number(request.temperature, "temperature", 0.0, float(np.finfo(np.float32).max))
        _integer(request.top_k, "top_k", 0, INT32)
        _number(request.top_p, "top_p", 0.0, 1.0, open_low=True)
        _integer(request.seed, "seed", -(2**63), 2**64)
        _integer(request.stream_id, "stream_id", 0, INT32)
        _integer(request.logprobs, "logprobs", 0, TOP_LOGPROBS + 1)
        if (request.stop_strings or request.incremental) and self.decode is None:
            raise EngineError("stop strings and streaming need the engine's decode function (a tokenizer)")

    def submit(self, request: Request, *, block: bool = False) -> Request:
        """Queues a request (raises EngineFull above max_queue unless block; EngineStopped once the
        background loop has stopped on a fatal error)."""
        self.check(request)
        request.submitted_at = time.perf_counter()
        with self._lock:
            if self.fatal is not None:
                raise EngineStopped(f"the engine stopped: {_one_line(self.fatal)}")
            if not block and len(self.queue) >= self.max_queue:
                raise EngineFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.queue.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Marks a request cancelled; the engine frees its slot (or drops it from the queue) next step."""
        request.cancelled = True
        with self._lock:
            self._lock.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def active_slots(self) -> int:
        return int((self.phase != FREE).sum())

    def idle(self) -> bool:
        return not self.queue and self.active_slots == 0 and self._inflight is None

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Offline: queues every request (no bound) and steps until all are finished, in this thread."""
        for r in requests:
            self.submit(r, block=True)
        while not all(r.finished for r in requests):
            self.step()
        return list(requests)

    def start(self) -> None:
        """Steps in a background thread whenever there is work (for the server)."""
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            while self._running:
                with self._lock:
                    while self._running and self.idle():
                        self._lock.wait(timeout=1.0)
                if self._running:
                    self.step()
        except BaseException as e:  # not one request's fault (those fail alone, in `step`): a device error
            self._die(e)

    def _die(self, e: BaseException) -> None:
        """The background loop is stopping on `e`: every queued and running request is finished with
        finish_reason "error" (no client waits forever), later submits are refused, then `on_fatal(e)`
        (without one, `e` is raised again: the thread's excepthook prints it)."""
        with self._lock:
            self.fatal, self._running = e, False
            victims = list(self.queue) + [r for r in self.requests if r is not None]
            self.queue.clear()
            self.requests = [None] * self.slots
            self.phase[:] = FREE
            self._inflight = None
        for r in victims:
            self._finish(r, "error", f"the engine stopped: {_one_line(e)}")
        if self.on_fatal is None:
            raise e
        self.on_fatal(e)

    def step(self) -> None:
        """One scheduling round (see `_step`); XLA compilations in it count in `compiles` (none after
        `warmup`)."""
        with self._counting():
            self._step()

    def _step(self) -> None:
        """One scheduling round: admit; dispatch one prefill call and one decode call; then, while the
        device runs them, read the previous decode call's tokens and this prefill's (stop checks free
        slots at once). Decode results are read one step late so that the host's work (reading,
        stop checks, streaming, admitting, building the next call) overlaps the device's instead of
        alternating with it: the device always has the next decode queued. The decode call includes
        the rows this prefill completes, fed their first token on the device. The price: a row that
        stops on a stop token or string computes one more (discarded) token, and its slot is refilled
        a step later; rows that reach max_tokens are never computed past it."""
        with self._lock:
            for r in [r for r in self.queue if r.cancelled]:
                self.queue.remove(r)
                self._finish(r, "abort")
            for b, r in enumerate(self.requests):
                if r is not None and r.cancelled:
                    self._free(b, "abort")
            for b in np.flatnonzero(self.phase == FREE):
                while self.queue and not self._admit(int(b), self.queue.popleft()):
                    pass  # that request failed alone; the slot goes to the next one
        prefill = None
        if self._prefill_due():
            self._prefill_waited = 0
            prefill = self._dispatch_prefill()
        elif (self.phase == PREFILL).any():
            self._prefill_waited += 1
        fresh = np.zeros(self.slots, bool)
        if prefill is not None:
            fresh[prefill["fresh"]] = True
        limits = np.array([r.max_tokens if r is not None else 0 for r in self.requests])
        active = ((self.phase == DECODE) | fresh) & (self.dispatched < limits)
        previous, self._inflight = self._inflight, None
        if active.any():
            self._inflight = self._dispatch_decode(active, fresh, prefill)
        if previous is not None:
            self._finish_decode(*previous)
        if prefill is not None:
            self._finish_prefill(prefill)
        if not self.overlap and self._inflight is not None:
            previous, self._inflight = self._inflight, None
            self._finish_decode(*previous)

    def _prefill_due(self) -> bool:
        """Whether this step makes a prefill call (see `prefill_batch`)."""
        waiting = np.flatnonzero(self.phase == PREFILL)
        if not len(waiting):
            return False
        with self._lock:
            queued = bool(self.queue)
        return (len(waiting) >= self.prefill_batch or not queued or not (self.phase == DECODE).any()
                or self._prefill_waited >= self.max_prefill_wait
                or any(self.requests[b]._prefilled > 0 for b in waiting))  # a long prompt's next chunk

    def _admit(self, b: int, r: Request) -> bool:
        """Gives slot b to r; False (and r finished with an error, the slot left free) if r cannot run:
        checked again here, since a Request may have been changed after `submit`."""
        try:
            self.check(r)
            self.temperature[b], self.top_k[b], self.top_p[b] = r.temperature, r.top_k, r.top_p
            self.seeds[b], self.streams[b] = np.int32(r.seed & 0x7FFFFFFF), r.stream_id
        except Exception as e:  # this request's fault: it fails alone and the loop goes on
            self._finish(r, "error", _one_line(e))
            return False
        self.requests[b] = r
        self.phase[b] = PREFILL
        self.dispatched[b] = 0
        r._prefilled = 0
        return True

    def _call(self, fn, *args, **kwargs):
        if self.mesh is None:
            return fn(*args, **kwargs)
        with jax.set_mesh(self.mesh):
            return fn(*args, **kwargs)

    def _prefill_group(self) -> list[int]:
        """The prefilling rows for this step's one prefill call: the oldest row, then rows of its kind
        (prompt logprobs or not; a prompt's first chunk or a later one), oldest first. First chunks are
        packed into one row (`_packed_prefill_step`): as many as fit in `prefill_chunk` tokens, at most
        `prefill_rows` prompts (a row that does not fit waits for the next call; the oldest always goes).
        A long prompt's later chunks go one row per call at `prefill_chunk` width. A row left out is older
        next time, so it is never passed over for long."""
        candidates = sorted(np.flatnonzero(self.phase == PREFILL), key=lambda b: self.requests[b].submitted_at)
        first = int(candidates[0])
        kind = self._kind(first)
        if not kind[1]:
            return [first]
        group, tokens = [first], self._chunk(first)
        for b in candidates[1:]:
            if len(group) == self.prefill_rows:
                break
            if self._kind(b) == kind and tokens + self._chunk(b) <= self.prefill_chunk:
                group.append(int(b))
                tokens += self._chunk(b)
        return group

    def _kind(self, b: int) -> tuple[bool, bool]:
        """(prompt logprobs, a first chunk): rows of one prefill call share both."""
        r = self.requests[b]
        return bool(r.prompt_logprobs), r._prefilled == 0

    def _chunk(self, b: int) -> int:
        r = self.requests[b]
        return min(len(r.prompt) - r._prefilled, self.prefill_chunk)

    def _dispatch_prefill(self) -> dict:
        """Sends one prefill call (see `_prefill_group`); returns what `_finish_prefill` needs."""
        group = self._prefill_group()
        reqs = [self.requests[b] for b in group]
        counts = [self._chunk(b) for b in group]
        packed = reqs[0]._prefilled == 0
        height = self.prefill_rows if packed else 1
        rows = np.full(height, self.slots, np.int32)  # padding prompts: past the end (read clipped, writes dropped)
        rows[: len(group)] = group
        sampling = [np.zeros(height, a.dtype) for a in (self.temperature, self.top_k, self.top_p, self.seeds,
                                                        self.streams)]
        for a, src in zip(sampling, (self.temperature, self.top_k, self.top_p, self.seeds, self.streams)):
            a[: len(group)] = src[group]
        chunks = [np.asarray(r.prompt[r._prefilled:r._prefilled + n + 1], np.int32) for r, n in zip(reqs, counts)]
        if packed:  # one row: the chunks back to back (ids and next-token targets), each its own segment
            width = prefill_width(sum(counts), self.prefill_chunk)
            ids, targets, segments, positions = (np.zeros(width, np.int32) for _ in range(4))
            ends, offsets = np.zeros(height, np.int32), np.cumsum([0] + counts[:-1]).tolist()
            for i, (c, n, at) in enumerate(zip(chunks, counts, offsets)):
                ids[at:at + n], targets[at:at + len(c) - 1] = c[:n], c[1:]
                segments[at:at + n], positions[at:at + n], ends[i] = i + 1, np.arange(n), at + n - 1
            step, statics = self._packed_step, (prompt_window(counts, width),)
            args = (rows, ends, ids, segments, positions, targets)
        else:  # a long prompt's later chunk: one row at prefill_chunk width
            width, (c,), (n,), offsets = self.prefill_chunk, chunks, counts, [None]
            ids, mask, targets = (np.zeros((1, width), np.int32) for _ in range(3))
            ids[0, :n], mask[0, :n], targets[0, :len(c) - 1] = c[:n], 1, c[1:]
            step, statics = self._prefill_step, ()
            args = (rows, ids, mask, np.array([reqs[0]._prefilled], np.int32), targets)
        fresh = [b for b, r, n in zip(group, reqs, counts) if r._prefilled + n == len(r.prompt) and r.max_tokens > 0]
        self.dispatched[fresh] = 1  # their first tokens come from this call
        alternatives = any(r.logprobs for r in reqs)
        want_top = np.bool_(alternatives or reqs[0].prompt_logprobs)
        out = self._call(step, SAMPLE, bool(reqs[0].prompt_logprobs), *statics, self.leaves, self.cache, *args,
                         *sampling, want_top)
        self.cache = out[-1]
        self.prefill_calls += 1
        self.prefill_tokens += width
        return {"group": group, "requests": reqs, "counts": counts, "offsets": offsets, "fresh": fresh,
                "out": out[:-2], "first": out[-2], "alternatives": alternatives}

    def _finish_prefill(self, p: dict) -> None:
        top = p["alternatives"]  # read the top-logprob arrays only if a row asked for them
        wanted = (True, True, top, top) + (p["requests"][0].prompt_logprobs,) * 3
        token, lp, top_lp, top_ids, t_lp, pt_lp, pt_ids = (_host(x) if w else None for x, w in zip(p["out"], wanted))
        now = time.perf_counter()
        for i, (b, r, n, at) in enumerate(zip(p["group"], p["requests"], p["counts"], p["offsets"])):
            if self.requests[b] is not r:  # cancelled meanwhile
                continue
            s = r._prefilled
            if r.prompt_logprobs:
                real = min(n, len(r.prompt) - 1 - s)  # positions whose target is a prompt token
                span = (slice(at, at + real),) if at is not None else (i, slice(0, real))  # packed or a row
                r.prompt_token_logprobs += t_lp[span].tolist()
                r.prompt_top_logprobs += [list(zip(ids_.tolist(), lps.tolist()))
                                          for ids_, lps in zip(pt_ids[span], pt_lp[span])]
            r._prefilled = s + n
            if r._prefilled < len(r.prompt):
                continue
            self.phase[b] = DECODE
            if r.max_tokens == 0:
                r.first_token_at = now
                self._free(b, "length")
                continue
            self._accept(b, int(token[i]), float(lp[i]), top_lp, top_ids, now, i)

    def _dispatch_decode(self, active, fresh, prefill: dict | None):
        """Sends one decode call for the `active` rows; returns what `_finish_decode` needs."""
        want_top = any(self.requests[b].logprobs for b in np.flatnonzero(active))
        first = self._tokens if prefill is None else prefill["first"]
        out = self._call(self._decode_step, SAMPLE, self.leaves, self.cache, self._tokens, first, fresh, active,
                         self.temperature, self.top_k, self.top_p, self.seeds, self.streams, self.dispatched.copy(),
                         np.bool_(want_top))
        self.cache, self._tokens = out[-1], out[0]
        self.dispatched[active] += 1
        self.decode_steps += 1
        return out[:-1], [(int(b), self.requests[b]) for b in np.flatnonzero(active)], want_top

    def _finish_decode(self, out, rows, want_top: bool) -> None:
        token, lp, top_lp, top_ids = (_host(x) if i < 2 or want_top else None for i, x in enumerate(out))
        now = time.perf_counter()
        for b, r in rows:
            if self.requests[b] is r:  # not freed since (a stop seen in the call before, a cancel)
                self._accept(b, int(token[b]), float(lp[b]), top_lp, top_ids, now, b)

    def _accept(self, b: int, token: int, lp: float, top_lp, top_ids, now: float, i: int) -> None:
        """Row b's new token (its alternatives: row i of top_lp / top_ids, read only if it asked)."""
        r = self.requests[b]
        if r.first_token_at is None:
            r.first_token_at = now
            self.ttft.append(now - r.submitted_at)
        r.tokens.append(token)
        r.token_logprobs.append(lp)
        if r.logprobs:
            r.top_logprobs.append(list(zip(top_ids[i, : r.logprobs].tolist(), top_lp[i, : r.logprobs].tolist())))
        self.generated_tokens += 1
        self._count_token(now)
        try:
            self._stop_or_update(b, r, token)
        except Exception as e:  # its decode function or its callback raised: this request fails alone
            if self.requests[b] is r:
                self._free(b, "error", _one_line(e))

    def _count_token(self, now: float) -> None:
        tick = int(now * RATE_BUCKETS / RATE_WINDOW)
        i = tick % RATE_BUCKETS
        if self._rate_ticks[i] != tick:  # the bucket held a tick RATE_WINDOW ago or more: reuse it
            self._rate_ticks[i], self._rate_counts[i] = tick, 0
        self._rate_counts[i] += 1

    def _stop_or_update(self, b: int, r: Request, token: int) -> None:
        """Frees row b if r's new token ends it (a stop id or string, max_tokens), else tells r's callback."""
        reason = None
        if token in r.stop_ids:
            reason = "stop"
        elif r.stop_strings or r.incremental:
            r.text = self.decode(r.tokens)
            if r.stop_strings:
                longest = max(len(s) for s in r.stop_strings)
                window = max(r._checked - longest, 0)
                hits = [p for p in (r.text.find(s, window) for s in r.stop_strings) if p >= 0]
                r._checked = len(r.text)
                if hits:
                    r.text, r._cut = r.text[: min(hits)], True
                    reason = "stop"
        if reason is None and len(r.tokens) >= r.max_tokens:
            reason = "length"
        if reason is not None:
            self._free(b, reason)
        elif r.on_update is not None:
            r.on_update(r)

    def _free(self, b: int, reason: str, error: str | None = None) -> None:
        r = self.requests[b]
        self.requests[b] = None
        self.phase[b] = FREE
        self._finish(r, reason, error)

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        """Ends r (reason "error" with `error`, the one-line why). Its decode function or callback
        raising here cannot hold up the others: the first makes it an error, the second is ignored (r
        is finished and `done` set whatever its callback does)."""
        if self.decode is not None and not r._cut:
            try:
                r.text = self.decode(r.tokens)
            except Exception as e:
                reason, error = "error", error or _one_line(e)
        r.finish_reason, r.error = reason, error
        r.finished_at = time.perf_counter()
        self.finished_requests += 1
        self.aborted_requests += reason == "abort"
        self.failed_requests += reason == "error"
        r.done.set()
        if r.on_update is not None:
            with contextlib.suppress(Exception):
                r.on_update(r)

    # -- warmup and metrics --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _counting(self):
        """XLA compilations in this thread inside the block count as this engine's (`compiles`)."""
        outer = getattr(_COMPILING, "engine", None)
        _COMPILING.engine = self
        try:
            yield
        finally:
            _COMPILING.engine = outer

    def warmup(self) -> int:
        """Compiles, now, every program a request can select, so that serving never compiles: with and
        without prompt logprobs, the packed first-chunk prefill at every width of the ladder (banded too
        where `prompt_window` allows) and a later chunk at `prefill_chunk`; and the decode step. (Sampling
        and top-logprob alternatives are run-time flags: no programs of their own.) Returns how many."""
        programs = 0
        with self._counting():
            for prompt_lp in (False, True):
                n, first = self._warm_prefill(prompt_lp)
                programs += n
            self._warm_decode(first)
            jax.block_until_ready(self.cache)
        return programs + 1

    def _warm_prefill(self, prompt_lp: bool) -> tuple[int, jax.Array]:
        """Compiles the prefill programs with or without prompt logprobs on padding rows (they write
        nowhere) -> (how many, the last call's first tokens per row: zeros, on the device)."""
        z = lambda n, dt=np.int32: np.zeros(n, dt)  # noqa: E731
        p = self.prefill_rows
        sampling = (z(p, np.float32), z(p), np.ones(p, np.float32), z(p), z(p))
        rows = np.full(p, self.slots, np.int32)  # writes nowhere
        width, programs = 0, 0
        while width < self.prefill_chunk:
            width = prefill_width(width + 1, self.prefill_chunk)
            for window in dict.fromkeys((None, prompt_window([1], width))):  # banded too where it applies
                out = self._call(self._packed_step, SAMPLE, prompt_lp, window, self.leaves, self.cache, rows, z(p),
                                 z(width), z(width), z(width), z(width), *sampling, np.bool_(False))
                self.cache = out[-1]
                programs += 1
        c = self.prefill_chunk
        out = self._call(self._prefill_step, SAMPLE, prompt_lp, self.leaves, self.cache, rows[:1], z((1, c)),
                         z((1, c)), z(1), z((1, c)), *(a[:1] for a in sampling), np.bool_(False))
        self.cache = out[-1]
        return programs + 1, out[-2]

    def _warm_decode(self, first: jax.Array) -> None:
        """Compiles the decode step (all rows inactive: it writes nowhere). Its token inputs are device
        arrays in a run (a prefill's first tokens, the previous decode's tokens); numpy ones would be
        another program (other input shardings): warm it with those."""
        self._tokens = first
        inactive = np.zeros(self.slots, bool)
        for fed in (first, None):  # fed by a prefill, then by the decode before: the inputs a run passes
            out = self._call(self._decode_step, SAMPLE, self.leaves, self.cache, self._tokens,
                             self._tokens if fed is None else fed, inactive, inactive, self.temperature, self.top_k,
                             self.top_p, self.seeds, self.streams, np.zeros(self.slots, np.int32), np.bool_(False))
            self.cache, self._tokens = out[-1], out[0]

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens generated in the last RATE_WINDOW seconds (to 0.1 s: the ticks after the one RATE_WINDOW
        ago), per second."""
        tick = int((time.perf_counter() if now is None else now) * RATE_BUCKETS / RATE_WINDOW)
        recent = sum(n for n, t in zip(self._rate_counts, self._rate_ticks) if tick - RATE_BUCKETS < t <= tick)
        return recent / RATE_WINDOW

    def metrics(self) -> dict:
        ttft = sorted(self.ttft)
        pick = lambda q: round(ttft[min(int(q * len(ttft)), len(ttft) - 1)], 4) if ttft else None  # noqa: E731
        return {"queue_depth": self.queue_depth, "active_slots": self.active_slots, "slots": self.slots,
                "tokens_per_second": round(self.tokens_per_second(), 2),
                "generated_tokens_total": self.generated_tokens, "finished_requests_total": self.finished_requests,
                "aborted_requests_total": self.aborted_requests, "failed_requests_total": self.failed_requests,
                "ttft_seconds_p50": pick(0.5), "ttft_seconds_p99": pick(0.99), "decode_steps_total": self.decode_steps,
                "prefill_calls_total": self.prefill_calls, "prefill_tokens_total": self.prefill_tokens,
                "max_model_len": self.max_model_len, "compiles_total": self.compiles,
                "kv_cache_bytes": self.cache_bytes}
