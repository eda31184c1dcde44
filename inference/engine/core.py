"""`Engine`: continuous batching over a paged KV cache. The host side: queue, scheduler, one device step
per `step()`, reading its tokens, stop checks, failures, metrics.

How a step runs (`_step`, on the host):
1. cancels are applied and newly submitted requests handed to the scheduler (checked again: a Request
   changed after `submit` fails alone);
2. the scheduler (scheduler.py, plain Python) plans the step: one token for every decoding sequence,
   then prompt chunks, oldest first, within the token budget (prefill_chunk + slots), admitting waiting
   requests while pages are free (reusing cached prefix pages) and preempting the youngest sequence when
   a decoding one needs a page and none is left (it is recomputed later: its tokens so far become its
   prompt, its outputs already in flight are dropped by the epoch check);
3. the plan goes to the device as ONE call (steps.py): every token of it in one ragged row padded to a
   width of the ladder (programs.py), attention over the pages through each sequence's page table;
4. with `overlap` (the default) the PREVIOUS call's tokens are read now, while the device runs this
   one: reading, stop checks, callbacks and the next plan overlap the device's work. A decoding
   sequence's newest token is then still on the device: the next call takes it from the previous call's
   output vector (`feed`), without a round trip. The price: a sequence that stops on a stop id or string
   has one more token computed (discarded). `overlap=False` reads each call in its own step.
Each new token is checked on the host: a stop id, a stop string in the incrementally decoded text,
max_tokens, or a cancel ends the request and releases its pages in the step that reads it (its full
prompt pages stay cached for reuse until evicted). Completions are decoded with `skip_special_tokens`.

Pool size: `num_pages`, or `kv_cache_memory` bytes (an int) or a fraction of the free device memory after
the weights (a float in (0, 1]); by default pages for `slots` sequences of max_model_len, capped at 0.9 of
the free memory. The pool must hold one max_model_len sequence (then no request that fits max_model_len
ever fails: the others are preempted for it).

Threading: `submit` / `cancel` from any thread; `step` from one thread only (the caller's, or the engine's
own after `start()`); `Request.on_update` is called from that thread.

Failures. `check` (called by `submit`) refuses with EngineError what could never be served. A request that
fails in the loop all the same (changed after submit, its decode function or callback raising) finishes
alone with finish_reason "error" and `Request.error` (one line). Anything else escaping a step (a device
error) stops the background loop: every queued and running request finishes with "error", `fatal` keeps
the exception, `submit` refuses (EngineStopped), and `on_fatal(e)` is called from the engine's thread.

Compilations in a step or warm-up count in `compiles` (one process-wide `jax.monitoring` listener routes
them to the engine running in the compiling thread); `warmup()` compiles every program, so a running
engine compiles nothing.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from inference.engine.metrics import Metrics, counting, listen_for_compiles
from inference.engine.programs import (
    empty_inputs,
    jitted_step,
    pages_format,
    plan_inputs,
    pool_pages,
    step_width,
    token_sharding,
    token_widths,
)
from inference.engine.request import (
    EngineError,
    EngineFull,
    EngineStopped,
    Request,
    check_request,
    one_line,
    stop_reason,
)
from inference.engine.scheduler import PagePool, Scheduler, Seq
from inference.generate import mesh_of, split_model
from jaxmodel.kv_cache import init_pages, pages_per_seq


def _host(x) -> np.ndarray:
    """A step output on the host; on a mesh spanning processes (every process runs the same schedule),
    gathered from all of them."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Engine:
    def __init__(self, model, *, slots: int = 8, max_num_seqs: int | None = None, max_model_len: int | None = None,
                 kv_cache_dtype: str | None = None, page_size: int = 16, num_pages: int | None = None,
                 kv_cache_memory: int | float | None = None, prefix_caching: bool = True, prefill_chunk: int = 256,
                 max_queue: int = 1024, decode: Callable[[list[int]], str] | None = None, overlap: bool = True,
                 on_fatal: Callable[[BaseException], None] | None = None):
        """model: an `nnx.Module` or its (graphdef, state) (int8 `QArray` weights work as they are).
        slots / max_num_seqs (the same; max_num_seqs wins): sequences running at once. decode: token ids ->
        text (skipping special tokens); needed for stop strings and `text`. on_fatal: called from the
        engine's thread with the exception that stopped the background loop (see `_die`)."""
        self.graphdef, self.state = split_model(model)
        merged = nnx.merge(self.graphdef, self.state)
        self.config = merged.config
        context = self.config.max_position_embeddings
        self.max_model_len = int(max_model_len or context)
        if not 1 <= self.max_model_len <= context:
            raise EngineError(f"max_model_len={max_model_len} must be in [1, {context}] (the model's context)")
        self.slots = int(max_num_seqs or slots)
        for name, value in (("slots", self.slots), ("prefill_chunk", prefill_chunk), ("page_size", page_size)):
            if value < 1:
                raise EngineError(f"{name}={value} must be positive")
        self.prefill_chunk, self.page_size, self.kv_cache_dtype = prefill_chunk, page_size, kv_cache_dtype
        self.max_queue, self.decode, self.overlap, self.on_fatal = max_queue, decode, overlap, on_fatal
        self.mesh = mesh_of(self.state)
        self.pages_per_row = pages_per_seq(self.max_model_len, page_size)
        self.num_pages = pool_pages(self.config, max_model_len=self.max_model_len, page_size=page_size,
                                    kv_cache_dtype=kv_cache_dtype, slots=self.slots, mesh=self.mesh,
                                    num_pages=num_pages, memory=kv_cache_memory)
        self.widths = token_widths(prefill_chunk, self.slots)
        pages = self._call(init_pages, self.config, self.num_pages, page_size, kv_dtype=kv_cache_dtype,
                           mesh=self.mesh, per_layer=merged.unstacked)
        formats = self._call(pages_format, self.graphdef, self.state, pages, rows=self.slots,
                             pages_per_row=self.pages_per_row)
        self.pages = jax.device_put(pages, formats, donate=True)
        self.cache_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(self.pages))
        self.leaves, treedef = jax.tree.flatten(self.state)
        tokens = token_sharding(self.mesh)
        self._step_fn = jitted_step(self.graphdef, treedef, formats, tokens)
        self._tokens = jax.device_put(np.zeros(self.slots, np.int32), tokens)  # the last call's output tokens
        self.scheduler = Scheduler(PagePool(self.num_pages, page_size, prefix_caching), self.slots,
                                   self.max_model_len, token_budget=prefill_chunk + self.slots,
                                   widths=self.widths)
        self.queue: collections.deque[Request] = collections.deque()  # submitted, not yet running
        self._seqs: dict[int, Seq] = {}  # the scheduler's sequences (waiting or running) by id
        self._next_id = 0
        self._rows: dict[int, tuple[int, int]] = {}  # seq id -> (row, epoch) in the last call that sampled it
        self._inflight = None  # the dispatched call whose outputs are unread
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.stats = Metrics()
        self.compiles = 0  # XLA compilations in this engine's steps and warm-up
        self.fatal: BaseException | None = None  # what stopped the background loop
        listen_for_compiles()

    # -- requests ---------------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Refuses (EngineError) what could never be served; called by `submit`."""
        check_request(request, vocab=self.config.vocab_size, max_model_len=self.max_model_len,
                      can_decode=self.decode is not None)

    def submit(self, request: Request, *, block: bool = False) -> Request:
        """Queues a request (raises EngineFull above max_queue unless block; EngineStopped once the
        background loop has stopped on a fatal error)."""
        self.check(request)
        request.submitted_at = time.perf_counter()
        with self._lock:
            if self.fatal is not None:
                raise EngineStopped(f"the engine stopped: {one_line(self.fatal)}")
            if not block and len(self.queue) >= self.max_queue:
                raise EngineFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.queue.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Marks a request cancelled; the engine ends it (abort) next step."""
        request.cancelled = True
        with self._lock:
            self._lock.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def active_slots(self) -> int:
        return self.scheduler.num_running

    @property
    def running(self) -> list[Request]:
        """The requests whose sequences run now (admitted, not preempted), oldest first."""
        return [s.request for s in self.scheduler.running]

    def idle(self) -> bool:
        return not self.queue and not self._seqs and self._inflight is None

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
            victims = list(self.queue) + [s.request for s in self._seqs.values() if s.request not in self.queue]
            self.queue.clear()
            for seq in self._seqs.values():
                self.scheduler.abort(seq)
            self._seqs.clear()
            self._inflight = None
        for r in victims:
            self._finish(r, "error", f"the engine stopped: {one_line(e)}")
        if self.on_fatal is None:
            raise e
        self.on_fatal(e)

    def step(self) -> None:
        """One scheduling round and device call (see the module docstring); XLA compilations in it count
        in `compiles` (none after `warmup`)."""
        with counting(self):
            self._step()

    def _step(self) -> None:
        with self._lock:
            self._apply_cancels()
            self._hand_over()
        plan = self.scheduler.schedule()
        with self._lock:
            for seq in plan.admitted:
                if seq.request in self.queue:  # its first admission (not a preempted one's return)
                    self.queue.remove(seq.request)
        previous, self._inflight = self._inflight, self._dispatch(plan) if plan.entries else None
        if previous is not None:
            self._read(*previous)
        if not self.overlap and self._inflight is not None:
            current, self._inflight = self._inflight, None
            self._read(*current)

    def _apply_cancels(self) -> None:
        for seq in [s for s in self._seqs.values() if s.request.cancelled]:
            self._end(seq, "abort")
        for r in [r for r in self.queue if r.cancelled and r._seq is None]:
            self.queue.remove(r)
            self._finish(r, "abort")

    def _hand_over(self) -> None:
        """Queued requests not yet with the scheduler become its sequences (FIFO), each checked again (a
        Request changed after `submit` fails alone here)."""
        for r in [r for r in self.queue if r._seq is None]:
            try:
                self.check(r)
            except EngineError as e:
                self.queue.remove(r)
                self._finish(r, "error", one_line(e))
                continue
            seq = Seq(self._next_id, [int(t) for t in r.prompt], r.max_tokens, reuse_prefix=not r.prompt_logprobs,
                      request=r)
            self._next_id += 1
            r._seq = seq
            self._seqs[seq.rid] = seq
            self.scheduler.add(seq)
            self.stats.prompt_tokens += seq.prompt_len

    def _end(self, seq: Seq, reason: str, error: str | None = None) -> None:
        """Ends seq's request: its pages go back (a finished prompt's full pages stay cached)."""
        (self.scheduler.abort if reason in ("abort", "error") else self.scheduler.finish)(seq)
        self._seqs.pop(seq.rid, None)
        with self._lock:
            if seq.request in self.queue:
                self.queue.remove(seq.request)
        self._finish(seq.request, reason, error)

    # -- one device call ------------------------------------------------------------------------------

    def _dispatch(self, plan):
        """Sends the plan's one device call -> what `_read` needs: (outputs, rows, prompt_lp, want_top)."""
        x, rows = plan_inputs(plan.entries, self._rows, width=step_width(plan.num_tokens, self.widths),
                              rows=self.slots, pages_per_row=self.pages_per_row)
        prompt_lp = any(e.seq.request.prompt_logprobs for e in plan.entries)
        want_top = bool(x.want_top)
        out, self.pages = self._call(self._step_fn, prompt_lp, self.leaves, self.pages, self._tokens, x)
        self._tokens = out.token
        self._rows = {e.seq.rid: (r, e.seq.epoch) for r, e in enumerate(plan.entries) if e.samples}
        s = self.stats
        s.steps += 1
        prefill = plan.entries[plan.num_decodes:]
        s.prefill_calls += bool(prefill)
        s.decode_steps += plan.num_decodes > 0
        s.prefill_tokens += sum(e.count for e in prefill)
        return out, rows, prompt_lp, want_top

    # -- reading a call's outputs ---------------------------------------------------------------------

    def _read(self, out, rows, prompt_lp: bool, want_top: bool) -> None:
        """A call's outputs to its requests. Rows of a sequence preempted (epoch changed) or ended since
        the call belong to no one."""
        token, lp = _host(out.token), _host(out.logprob)
        top = (_host(out.top_logprobs), _host(out.top_ids)) if want_top else None
        prompt = tuple(_host(a) for a in (out.prompt_logprobs, out.prompt_top_logprobs, out.prompt_top_ids)) \
            if prompt_lp else None
        now, at = time.perf_counter(), 0
        for i, (seq, epoch, start, count, samples) in enumerate(rows):
            span, at = (at, at + count), at + count
            r = seq.request
            if seq.epoch != epoch or r.finished:
                continue
            try:
                if r.prompt_logprobs:
                    self._prompt_logprobs(r, start, span, prompt, want_top)
                if samples:
                    self._accept(seq, int(token[i]), float(lp[i]), top, i, now)
            except Exception as e:  # its decode function or its callback raised: this request fails alone
                if not r.finished:
                    self._end(seq, "error", one_line(e))

    def _prompt_logprobs(self, r: Request, start: int, span, prompt, want_top: bool) -> None:
        """Records the prompt log-probabilities of positions start.. of this row (each target: the next
        prompt token), those not recorded yet (a preempted sequence recomputes its prompt)."""
        lps, top_lps, top_ids = prompt
        for t in range(span[1] - span[0]):
            position = start + t
            if position != len(r.prompt_token_logprobs) or position >= len(r.prompt) - 1:
                continue
            r.prompt_token_logprobs.append(float(lps[span[0] + t]))
            r.prompt_top_logprobs.append(list(zip(top_ids[span[0] + t].tolist(), top_lps[span[0] + t].tolist()))
                                         if want_top else [])

    def _accept(self, seq: Seq, token: int, lp: float, top, i: int, now: float) -> None:
        """seq's sampled token (row i of the call)."""
        r = seq.request
        if r.max_tokens == 0:  # the prompt alone was asked for (its logprobs)
            r.first_token_at = now
            self._end(seq, "length")
            return
        if r.first_token_at is None:
            r.first_token_at = now
            self.stats.ttft.append(now - r.submitted_at)
        seq.tokens.append(token)
        r.tokens.append(token)
        r.token_logprobs.append(lp)
        if r.logprobs:
            r.top_logprobs.append(list(zip(top[1][i, :r.logprobs].tolist(), top[0][i, :r.logprobs].tolist())))
        self.stats.count_token(now)
        reason = stop_reason(r, token, self.decode)
        if reason is not None:
            self._end(seq, reason)
        elif r.on_update is not None:
            r.on_update(r)

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        """Ends r (reason "error" with `error`, the one-line why). Its decode function or callback
        raising here cannot hold up the others: the first makes it an error, the second is ignored (r
        is finished and `done` set whatever its callback does)."""
        if self.decode is not None and not r._cut:
            try:
                r.text = self.decode(r.tokens)
            except Exception as e:
                reason, error = "error", error or one_line(e)
        r.finish_reason, r.error = reason, error
        r.finished_at = time.perf_counter()
        self.stats.count_finish(reason)
        r.done.set()
        if r.on_update is not None:
            with contextlib.suppress(Exception):
                r.on_update(r)

    # -- warm-up, metrics ------------------------------------------------------------------------------

    def _call(self, fn, *args, **kwargs):
        if self.mesh is None:
            return fn(*args, **kwargs)
        with jax.set_mesh(self.mesh):
            return fn(*args, **kwargs)

    def warmup(self, prompt_logprobs: bool = True) -> int:
        """Compiles, now, every program a step can select (each token width, with and without prompt
        logprobs: `programs.engine_programs` lists the same), running each on a step without sequences
        (it writes nothing). Returns how many. prompt_logprobs=False leaves out the programs only
        prompt-logprob (echo) requests select, for a caller that never sends one (Generator)."""
        flags = (False, True) if prompt_logprobs else (False,)
        with counting(self):
            for width in self.widths:
                for prompt_lp in flags:
                    x = empty_inputs(width, self.slots, self.pages_per_row)
                    out, self.pages = self._call(self._step_fn, prompt_lp, self.leaves, self.pages, self._tokens, x)
                    self._tokens = out.token
            jax.block_until_ready(self.pages)
        return len(flags) * len(self.widths)

    def metrics(self) -> dict:
        pool, sched = self.scheduler.pool, self.scheduler
        return {"queue_depth": self.queue_depth, "active_slots": self.active_slots, "slots": self.slots,
                **self.stats.snapshot(), "prefix_hit_tokens_total": sched.prefix_hit_tokens_total,
                "prefix_hit_requests_total": sched.prefix_hit_requests_total,
                "preemptions_total": sched.preemptions_total, "max_model_len": self.max_model_len,
                "compiles_total": self.compiles, "kv_cache_bytes": self.cache_bytes,
                "kv_pages_total": pool.num_pages, "kv_pages_free": pool.num_free, "kv_pages_cached": pool.num_cached,
                "page_size": self.page_size}

    # counters under their old names (bench/serve.py reads them)
    decode_steps = property(lambda self: self.stats.decode_steps)
    prefill_calls = property(lambda self: self.stats.prefill_calls)
    prefill_tokens = property(lambda self: self.stats.prefill_tokens)
