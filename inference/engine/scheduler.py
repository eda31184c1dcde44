"""The engine's scheduler in plain Python (no JAX): which tokens of which sequences go into the next step.

- `Seq`: the scheduler's view of one request (its tokens, page table row, how far it is computed).
- `Scheduler.schedule() -> Plan`: one device step's work, as `Entry(seq, start, count, samples)` rows in
  call order: every decoding sequence's next token first (oldest first), then prefill chunks of prompts
  (oldest first), all within `token_budget` tokens, the last chunk trimmed to fill a program width
  where that beats padding (`_fit`). The engine packs them into one ragged call.
- `PagePool` (pages.py): page numbers, refcounts, prefix table, LRU.

Choices that are not obvious:
- Admission is FIFO and never skips the head: a long prompt waiting for pages is not starved by short
  ones behind it. It is admitted when fewer than `max_num_seqs` run and pages for its known tokens not
  found in the prefix cache are available, plus `decode_reserve` pages when anything else runs (so the
  newcomer does not force a preemption at the next page boundary). All of a prompt's pages are taken at
  admission; only decoding grows a sequence, one page at a boundary.
- Prefix matching never covers the last known token: at least one token is computed, so its logits exist.
- Preemption by recompute: when a decoding sequence needs a page and none is available, the youngest
  running sequence (maybe itself) releases its pages and goes back to the FRONT of the waiting queue with
  its known tokens (prompt + generated so far); its epoch is bumped so the engine drops outputs already in
  flight for it. Its full pages stay in the prefix cache, so the recompute is mostly prefix hits. No new
  sequence is admitted in a step that preempted. Because the oldest running sequence is preempted only
  when it runs alone, and a lone sequence can always grow (the pool holds one max_model_len sequence,
  checked at construction), every sequence that fits max_model_len finishes.
- Pages are registered in the prefix table when the call that writes them is planned: device calls run in
  the order they are planned, so any later call that reads them runs after that write.
- The running list is kept in arrival order (admission is FIFO and preempted sequences re-enter at the
  front), so "youngest" is its last element.
"""

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from inference.engine.pages import PagePool

__all__ = ["Entry", "PagePool", "Plan", "Scheduler", "Seq"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)  # identity equality: two requests with the same tokens are different sequences
class Seq:
    """One request as the scheduler sees it. The engine appends each generated token it reads (of the
    current epoch) to `tokens`; everything else is the scheduler's to change."""

    rid: int
    tokens: list[int]
    max_tokens: int
    reuse_prefix: bool = True  # False for prompt-logprob requests: they need logits at every prompt token
    request: object = None  # the engine's request object, carried along
    prompt_len: int = field(init=False)
    limit: int = field(init=False, default=0)  # positions ever computed (set by Scheduler.add)
    pages: list[int] = field(init=False, default_factory=list)  # page table row
    keys: list[int] = field(init=False, default_factory=list)  # prefix-table key ids of its first pages
    num_scheduled: int = field(init=False, default=0)  # positions whose K/V is written or in flight
    epoch: int = field(init=False, default=0)  # +1 at each preemption
    cached_tokens: int = field(init=False, default=0)  # prefix-hit tokens at the last admission
    arrival: int = field(init=False, default=-1)
    state: str = field(init=False, default="new")  # new, waiting, running, done
    decoding: bool = field(init=False, default=False)  # sampled at least once since admission

    def __post_init__(self):
        self.tokens = list(self.tokens)
        self.prompt_len = len(self.tokens)

    @property
    def known(self) -> int:
        """Positions whose token the host knows and that are to be computed."""
        return min(len(self.tokens), self.limit)


class Entry(NamedTuple):
    """Positions start .. start+count-1 of seq in this call (kv_len = start + count). Their ids are
    seq.tokens[p]; the one position past the known tokens (a decode entry's start) takes the previous
    call's output for seq. samples: the logits at the entry's last position are sampled."""

    seq: Seq
    start: int
    count: int
    samples: bool


@dataclass
class Plan:
    entries: list[Entry] = field(default_factory=list)  # call order: decodes, then prefill chunks
    num_decodes: int = 0  # entries[:num_decodes] are decode tokens, the rest prefill chunks
    preempted: list[Seq] = field(default_factory=list)
    admitted: list[Seq] = field(default_factory=list)
    prefix_hit_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(e.count for e in self.entries)


class Scheduler:
    """Admission, page growth, chunked prefill, prefix matching and preemption over one PagePool."""

    def __init__(self, pool: PagePool, max_num_seqs: int, max_model_len: int, token_budget: int,
                 decode_reserve: int = 1, widths: Sequence[int] = ()):
        """widths: the device's program widths (ascending), for `_fit`; none: plans are never trimmed."""
        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("token_budget", token_budget)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if int(decode_reserve) < 0:
            raise ValueError(f"decode_reserve must be >= 0, got {decode_reserve}")
        if token_budget < max_num_seqs:
            # Every running sequence decodes every step: a skipped decode would lose its fed token.
            raise ValueError(f"token_budget ({token_budget}) must be >= max_num_seqs ({max_num_seqs})")
        self.pages_per_seq = _cdiv(int(max_model_len), pool.page_size)
        if pool.num_pages < self.pages_per_seq:
            raise ValueError(f"the pool's {pool.num_pages} pages of {pool.page_size} tokens cannot hold one "
                             f"sequence of max_model_len {max_model_len} ({self.pages_per_seq} pages)")
        self.pool = pool
        self.max_num_seqs = int(max_num_seqs)
        self.max_model_len = int(max_model_len)
        self.token_budget = int(token_budget)
        self.decode_reserve = int(decode_reserve)
        self.widths = sorted(int(w) for w in widths)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._arrivals = 0
        self._refused = None  # (head of waiting, pool.version) at the last admission refused for pages
        self.prefix_hit_tokens_total = 0
        self.prefix_hit_requests_total = 0
        self.preemptions_total = 0
        self.prefill_tokens_total = 0  # tokens of prefill entries planned (computed, prefix hits excluded)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- the queue -------------------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        if seq.state != "new":
            raise ValueError(f"sequence {seq.rid} was already added")
        if not 1 <= seq.prompt_len <= self.max_model_len:
            raise ValueError(f"sequence {seq.rid} has {seq.prompt_len} prompt tokens; 1 to max_model_len "
                             f"({self.max_model_len}) fit")
        if seq.max_tokens < 0:
            raise ValueError(f"sequence {seq.rid} has max_tokens {seq.max_tokens} < 0")
        # The last generated token is sampled, never fed: positions up to prompt + max_tokens - 1.
        seq.limit = min(max(seq.prompt_len, seq.prompt_len + seq.max_tokens - 1), self.max_model_len)
        seq.arrival = self._arrivals
        self._arrivals += 1
        seq.state = "waiting"
        self.waiting.append(seq)

    def abort(self, seq: Seq) -> None:
        """Drop seq wherever it is; its pages go back to the pool (calls in flight may still write them:
        device calls run in order, so any new owner's writes land after)."""
        self._drop(seq, register=False)

    def finish(self, seq: Seq) -> None:
        """seq is done: its last full pages of known tokens become findable, then its pages are released."""
        self._drop(seq, register=True)

    def _drop(self, seq: Seq, register: bool) -> None:
        if seq.state == "waiting":
            self.waiting.remove(seq)
        elif seq.state == "running":
            if register:
                self._register(seq)
            self.running.remove(seq)
            self.pool.release(seq.pages)
        seq.pages, seq.keys, seq.state = [], [], "done"

    # -- one step ----------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """The next device step's entries; call once per step, the steps run in this order."""
        plan = Plan()
        for seq in self._grow(plan):
            plan.entries.append(Entry(seq, seq.num_scheduled, 1, True))
        plan.num_decodes = len(plan.entries)
        budget = self.token_budget - len(plan.entries)
        for seq in self.running:
            if budget == 0:
                break
            if not seq.decoding and seq.num_scheduled < seq.known:
                budget -= self._chunk(plan, seq, budget)
        if not plan.preempted:
            self._admit(plan, budget)
        self._fit(plan)
        for entry in plan.entries:
            entry.seq.num_scheduled = entry.start + entry.count
            if entry.samples:
                entry.seq.decoding = True
            self._register(entry.seq)
        return plan

    def _grow(self, plan: Plan) -> list[Seq]:
        """The decoding sequences of this step, each with a page for its next position; preempts the
        youngest running sequence while a page is missing."""
        decoding = []
        for seq in list(self.running):  # oldest first; preempted ones (always younger) are skipped
            if seq.state != "running" or not seq.decoding or seq.num_scheduled >= seq.limit:
                continue
            need = _cdiv(seq.num_scheduled + 1, self.pool.page_size) - len(seq.pages)
            while need > 0:
                pages = self.pool.allocate(need)
                if pages is not None:
                    seq.pages += pages
                    break
                victim = self.running[-1]
                self._preempt(plan, victim)
                if victim is seq:
                    break
            if seq.state == "running":
                decoding.append(seq)
        return decoding

    def _preempt(self, plan: Plan, seq: Seq) -> None:
        self._register(seq)  # its full pages stay findable: the recompute is mostly prefix hits
        self.running.remove(seq)
        self.pool.release(seq.pages)
        seq.pages, seq.keys = [], []
        seq.num_scheduled, seq.decoding, seq.cached_tokens = 0, False, 0
        seq.epoch += 1
        seq.state = "waiting"
        self.waiting.appendleft(seq)  # youngest first, so several preempted keep arrival order
        plan.preempted.append(seq)
        self.preemptions_total += 1

    def _chunk(self, plan: Plan, seq: Seq, budget: int) -> int:
        count = min(budget, seq.known - seq.num_scheduled)
        end = seq.num_scheduled + count
        plan.entries.append(Entry(seq, seq.num_scheduled, count, end == seq.known))
        self.prefill_tokens_total += count
        return count

    def _fit(self, plan: Plan) -> None:
        """Trims the plan's last prompt chunk to the program width below its token count when that defers
        fewer tokens than the padding up to the next width would waste (66 tokens run as 64, not padded
        to 96), and only when a decoding sequence makes a next step certain (the deferred tokens join it;
        a lone prompt is never delayed)."""
        n = plan.num_tokens
        width = next((w for w in self.widths if w >= n), n)
        lower = max((w for w in self.widths if w < n), default=0)
        last = plan.entries[-1] if plan.entries else None
        excess = n - lower
        if (lower == 0 or excess >= width - n or last is None or last.seq.decoding or last.count <= excess
                or not any(e.seq.decoding for e in plan.entries)):
            return
        plan.entries[-1] = Entry(last.seq, last.start, last.count - excess, False)
        self.prefill_tokens_total -= excess

    def _admit(self, plan: Plan, budget: int) -> None:
        """FIFO admission while sequences, budget and pages allow; the head is never skipped."""
        size = self.pool.page_size
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._refused == (seq, self.pool.version):
                return  # nothing was released or registered since it was refused
            known = seq.known
            hit, keys = self.pool.match(seq.tokens[:known - 1]) if seq.reuse_prefix else ([], [])
            need = _cdiv(known, size) - len(hit)
            reserve = self.decode_reserve if self.running else 0
            if self.pool.num_available < need + reserve:
                self.pool.release(hit)
                self._refused = (seq, self.pool.version)
                return
            self.waiting.popleft()
            seq.pages, seq.keys = hit + self.pool.allocate(need), keys
            seq.num_scheduled = seq.cached_tokens = len(hit) * size
            seq.state = "running"
            self.running.append(seq)
            plan.admitted.append(seq)
            if hit:
                plan.prefix_hit_tokens += seq.cached_tokens
                self.prefix_hit_tokens_total += seq.cached_tokens
                self.prefix_hit_requests_total += 1
            budget -= self._chunk(plan, seq, budget)

    def _register(self, seq: Seq) -> None:
        self.pool.register(seq.pages, seq.tokens, seq.num_scheduled, seq.keys)
