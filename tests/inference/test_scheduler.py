"""The engine's scheduler and page pool, with no device: admission (by sequences and by pages, FIFO),
chunked prefill within the token budget (decodes first, prefills oldest first), page growth at boundaries,
preemption of the youngest with recompute, prefix matching of full pages (exact chained keys, never the
last token), refcounts, LRU eviction, pages shared by running sequences, metrics counters, and a
randomized simulation checking the invariants every step. The scheduler imports no JAX (a subprocess
shows it)."""

import collections
import random
import subprocess
import sys
from pathlib import Path

import pytest

from inference.engine.pages import PagePool
from inference.engine.scheduler import Scheduler, Seq

ROOT = Path(__file__).resolve().parents[2]


def test_scheduler_and_pool_import_no_jax():
    # Stub the two parent packages (their __init__ files load the model code) so only pages.py and
    # scheduler.py run: they alone must not pull in JAX.
    packages = [("inference", str(ROOT / "inference")), ("inference.engine", str(ROOT / "inference/engine"))]
    code = f"""
import sys, types
for name, path in {packages!r}:
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module
from inference.engine.scheduler import PagePool, Scheduler, Seq
sched = Scheduler(PagePool(8, 4), max_num_seqs=2, max_model_len=16, token_budget=8)
sched.add(Seq(0, [5, 6, 7], max_tokens=4))
assert [(e.start, e.count, e.samples) for e in sched.schedule().entries] == [(0, 3, True)]
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "jaxmodel", "flax"))
print("leaked:", leaked)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "leaked: []"


def make(num_pages=64, page_size=4, max_num_seqs=4, max_model_len=32, token_budget=64, decode_reserve=1,
         prefix_caching=True, widths=()) -> Scheduler:
    return Scheduler(PagePool(num_pages, page_size, prefix_caching), max_num_seqs, max_model_len, token_budget,
                     decode_reserve, widths)


def rows(plan):
    return [(e.seq.rid, e.start, e.count, e.samples) for e in plan.entries]


def add(sched, rid, n, max_tokens=8, first=None, **kw) -> Seq:
    """A sequence of n consecutive ids from `first` (default: its own range, so no prefix is shared)."""
    first = 1000 * (rid + 1) if first is None else first
    seq = Seq(rid, list(range(first, first + n)), max_tokens, **kw)
    sched.add(seq)
    return seq


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_budget=3, max_num_seqs=4), "token_budget (3) must be >= max_num_seqs (4)"),
    (dict(num_pages=7), "cannot hold one sequence of max_model_len 32 (8 pages)"),
    (dict(max_num_seqs=0), "max_num_seqs must be >= 1, got 0"),
    (dict(decode_reserve=-1), "decode_reserve must be >= 0, got -1"),
])
def test_bad_values_are_refused_with_one_line(kwargs, message):
    with pytest.raises(ValueError) as e:
        make(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_add_refuses_prompts_that_do_not_fit():
    sched = make()
    with pytest.raises(ValueError, match="33 prompt tokens; 1 to max_model_len"):
        add(sched, 0, 33)
    with pytest.raises(ValueError, match="0 prompt tokens"):
        add(sched, 1, 0)


def test_admission_is_limited_by_max_num_seqs():
    sched = make(max_num_seqs=2)
    a, b, c = (add(sched, i, 5) for i in range(3))
    plan = sched.schedule()
    assert plan.admitted == [a, b] and list(sched.waiting) == [c]
    assert rows(plan) == [(0, 0, 5, True), (1, 0, 5, True)]
    sched.finish(a)
    plan = sched.schedule()
    assert plan.admitted == [c]
    assert rows(plan) == [(1, 5, 1, True), (2, 0, 5, True)]  # b's decode before c's prefill


def test_admission_waits_for_pages_in_fifo_order():
    sched = make(num_pages=8, max_model_len=32)  # 8 pages of 4 tokens
    a, b, c = add(sched, 0, 20), add(sched, 1, 16), add(sched, 2, 2)
    plan = sched.schedule()
    # a takes 5 pages; b needs 4 + 1 reserve > 3 left; c would fit but never overtakes b.
    assert plan.admitted == [a] and list(sched.waiting) == [b, c]
    assert len(a.pages) == 5 and sched.pool.num_free == 3
    sched.finish(a)
    assert sched.schedule().admitted == [b, c]


class CountingPool(PagePool):
    matches = 0

    def match(self, tokens):
        self.matches += 1
        return super().match(tokens)


def test_a_refused_head_is_retried_only_once_pages_are_released():
    pool = CountingPool(8, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_model_len=32, token_budget=64)
    a, b = add(sched, 0, 20), add(sched, 1, 30)
    sched.schedule()  # a is admitted, b refused; then a's planned pages are registered (b may match them)
    for _ in range(5):  # b is tried once more, then waits without a match per step
        assert sched.schedule().admitted == []
    assert pool.matches == 3
    sched.finish(a)
    assert sched.schedule().admitted == [b] and pool.matches == 4


def test_chunked_prefill_stays_in_budget_with_decodes_first_and_oldest_first():
    sched = make(token_budget=8)
    add(sched, 0, 10), add(sched, 1, 10)
    plans = [rows(sched.schedule()) for _ in range(4)]
    assert plans == [
        [(0, 0, 8, False)],  # no budget left to admit b
        [(0, 8, 2, True), (1, 0, 6, False)],
        [(0, 10, 1, True), (1, 6, 4, True)],  # a decodes first
        [(0, 11, 1, True), (1, 10, 1, True)],
    ]
    assert sched.prefill_tokens_total == 20


def test_the_last_prompt_chunk_is_trimmed_to_a_program_width_only_beside_a_decoding_sequence():
    """Widths 16/24/32: 26 tokens would pad to 32; with a sequence decoding, the newest prompt's chunk gives
    up 2 tokens to run as 24 (they join the next step); a lone prompt, or a plan whose trim would defer
    more than the padding wastes, is never trimmed."""
    def sched_with_widths():
        return Scheduler(PagePool(64, 4), 4, 64, token_budget=32, widths=[16, 24, 32])

    sched = sched_with_widths()
    add(sched, 0, 25)
    assert rows(sched.schedule()) == [(0, 0, 25, True)]  # alone: 25 tokens padded to 32, not delayed
    add(sched, 1, 25)
    assert rows(sched.schedule()) == [(0, 25, 1, True), (1, 0, 23, False)]  # 26 -> 24
    assert rows(sched.schedule()) == [(0, 26, 1, True), (1, 23, 2, True)]
    add(sched, 2, 20)  # 2 decoding + 20 = 22: trimming to 16 defers 6, padding to 24 wastes 2: no trim
    assert rows(sched.schedule()) == [(0, 27, 1, True), (1, 25, 1, True), (2, 0, 20, True)]
    assert sched.prefill_tokens_total == 25 + 25 + 20


def test_decode_grows_one_page_at_each_boundary_and_stops_at_the_limit():
    sched = make(page_size=4)
    a = add(sched, 0, 4, max_tokens=10)  # positions 0 .. 12 are computed (the 10th token is never fed)
    assert rows(sched.schedule()) == [(0, 0, 4, True)] and len(a.pages) == 1
    sizes = []
    for position in range(4, 13):
        assert rows(sched.schedule()) == [(0, position, 1, True)]
        sizes.append(len(a.pages))
        assert len(set(a.pages)) == len(a.pages)
    assert sizes == [2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert sched.schedule().entries == [] and a.state == "running"  # waits for the engine's finish()
    sched.finish(a)
    assert sched.pool.num_used == 0


def test_pool_running_out_preempts_the_youngest_back_to_the_front_for_recompute():
    sched = make(num_pages=6, max_model_len=16, decode_reserve=0)
    a, b, c = add(sched, 0, 8, first=10), add(sched, 1, 8, first=20), add(sched, 2, 8, first=30)
    d = add(sched, 3, 4, first=40)  # waits: max_num_seqs allows it but no pages are left
    assert rows(sched.schedule()) == [(0, 0, 8, True), (1, 0, 8, True), (2, 0, 8, True)]
    c.tokens.append(7)  # the engine read c's first generated token
    plan = sched.schedule()  # a's and b's decodes each need a 3rd page: c goes
    assert plan.preempted == [c] and rows(plan) == [(0, 8, 1, True), (1, 8, 1, True)]
    assert plan.admitted == []  # nobody is admitted in a step that preempted
    assert list(sched.waiting) == [c, d] and sched.running == [a, b]
    assert (c.state, c.epoch, c.num_scheduled, c.pages, c.tokens) == ("waiting", 1, 0, [], list(range(30, 38)) + [7])
    assert sched.preemptions_total == 1
    sched.finish(a)
    plan = sched.schedule()
    assert plan.admitted == [c]  # c recomputes prompt + known generated token, then decodes on
    assert rows(plan)[-1] == (2, c.cached_tokens, 9 - c.cached_tokens, True)


def test_the_youngest_goes_even_when_an_older_one_needs_the_page():
    sched = make(num_pages=4, max_model_len=16, decode_reserve=0)
    add(sched, 0, 6), add(sched, 1, 4)
    c = add(sched, 2, 4)  # takes the last page
    sched.schedule()
    plan = sched.schedule()  # b needs a 2nd page, none is left: c, the youngest, goes
    assert plan.preempted == [c] and rows(plan) == [(0, 6, 1, True), (1, 4, 1, True)]


def test_the_youngest_preempts_itself_and_the_oldest_keeps_going():
    sched = make(num_pages=4, max_model_len=16, decode_reserve=0)
    add(sched, 0, 6)
    b = add(sched, 1, 8)
    sched.schedule()  # a: 2 pages, b: 2 pages, none free
    plan = sched.schedule()  # a decodes within its page; b at position 8 needs a page and is the youngest
    assert plan.preempted == [b] and rows(plan) == [(0, 6, 1, True)] and b.epoch == 1


def test_pool_match_uses_exact_chained_keys_of_full_pages():
    pool = PagePool(8, 4)
    pages = pool.allocate(2)
    keys = []
    pool.register(pages, [1, 2, 3, 4, 5, 6, 7, 8, 9], 9, keys)
    assert len(keys) == 2 and pool.registered(pages[0]) and pool.registered(pages[1])
    pool.release(pages)
    assert (pool.num_cached, pool.num_free) == (2, 6)
    assert pool.match([9, 9, 9, 9, 5, 6, 7, 8]) == ([], [])  # same page tokens, another prefix: no match
    assert pool.match([1, 2, 3, 5, 5, 6, 7, 8]) == ([], [])
    hit, hit_keys = pool.match([1, 2, 3, 4, 5, 6, 7])  # the partial second page does not match
    assert hit == pages[:1] and hit_keys == keys[:1] and pool.refcount(pages[0]) == 1
    assert pool.match([1, 2, 3, 4, 5, 6, 7, 8, 0]) == (pages, keys) and pool.refcount(pages[0]) == 2
    pool.release(pages + pages[:1])
    assert (pool.num_cached, pool.num_used) == (2, 0)


def test_lru_evicts_only_unreferenced_pages_oldest_first():
    pool = PagePool(3, 2)
    pages = pool.allocate(3)
    for i, page in enumerate(pages):
        pool.register([page], [i, i], 2, [])
    assert pool.allocate(1) is None
    pool.release([pages[2]])
    pool.release([pages[0]])
    pool.release([pages[1]])  # LRU order now: 2, 0, 1
    held, _ = pool.match([0, 0])  # page 0 is in use again
    assert held == [pages[0]] and pool.num_available == 2
    assert pool.allocate(3) is None and pool.num_available == 2  # nothing taken on failure
    assert pool.allocate(1) == [pages[2]]  # the least recently used unreferenced page
    assert pool.match([2, 2]) == ([], [])  # its key went with it
    assert pool.match([1, 1])[0] == [pages[1]]  # the others stay findable
    with pytest.raises(ValueError, match="released more often than taken"):
        pool.release([pages[0], pages[0], pages[0]])


def test_prefix_pages_are_shared_by_running_sequences_and_never_cover_the_last_token():
    sched = make()
    a = add(sched, 0, 9, first=100)
    sched.schedule()  # a's prefill is planned: its 2 full pages are findable at once
    b, c = add(sched, 1, 9, first=100), add(sched, 2, 8, first=100)  # same 9 tokens; c = the first 8
    plan = sched.schedule()
    assert plan.admitted == [b, c] and plan.prefix_hit_tokens == 8 + 4
    assert b.pages[:2] == a.pages[:2] and c.pages[:1] == a.pages[:1] and c.pages[1] != a.pages[1]
    assert rows(plan) == [(0, 9, 1, True), (1, 8, 1, True), (2, 4, 4, True)]  # c's last token is computed
    assert [sched.pool.refcount(p) for p in a.pages[:2]] == [3, 2]
    assert (sched.prefix_hit_tokens_total, sched.prefix_hit_requests_total, sched.prefill_tokens_total) == (12, 2, 14)
    for seq in (a, b, c):
        sched.finish(seq)
    assert sched.pool.num_used == 0 and sched.pool.num_cached >= 2


def test_finished_conversations_are_found_again_with_their_generated_tokens():
    sched = make(page_size=4)
    a = add(sched, 0, 5, max_tokens=6, first=100)
    sched.schedule()
    for token in (7, 8, 9):  # the engine reads a generated token after each step
        sched.schedule()
        a.tokens.append(token)
    assert len(a.keys) == 1  # the last token of page 2 was not known when its write was planned
    sched.finish(a)  # 8 tokens known and computed: page 2 is registered now
    b = Seq(1, a.tokens + [11, 12], max_tokens=4)  # the next turn of the conversation
    sched.add(b)
    plan = sched.schedule()
    assert b.cached_tokens == 8 and rows(plan) == [(1, 8, 2, True)]


def test_prompt_logprob_requests_skip_the_prefix_cache_but_feed_it():
    sched = make()
    a = add(sched, 0, 9, first=100, reuse_prefix=False)
    sched.schedule()
    b = add(sched, 1, 9, first=100, reuse_prefix=False)
    c = add(sched, 2, 9, first=100)
    plan = sched.schedule()
    assert b.cached_tokens == 0 and rows(plan)[1] == (1, 0, 9, True)
    assert c.cached_tokens == 8 and c.pages[:2] == a.pages[:2]


def test_prefix_caching_off_matches_nothing_and_caches_nothing():
    sched = make(prefix_caching=False)
    a = add(sched, 0, 9, first=100)
    sched.schedule()
    sched.finish(a)
    b = add(sched, 1, 9, first=100)
    plan = sched.schedule()
    assert b.cached_tokens == 0 and rows(plan) == [(1, 0, 9, True)]
    assert sched.pool.num_cached == 0 and sched.prefix_hit_requests_total == 0


def test_abort_releases_pages_wherever_the_sequence_is():
    sched = make(max_num_seqs=1)
    a, b = add(sched, 0, 9), add(sched, 1, 9)
    sched.schedule()
    sched.abort(b)
    sched.abort(a)
    sched.abort(a)  # idempotent
    assert (sched.num_running, sched.num_waiting, sched.pool.num_used) == (0, 0, 0)
    assert a.state == b.state == "done"


# -- a fake engine: plans run in order on a fake device, outputs are read one step late ----------------
VOCAB, STOP = 24, 0  # the stop token ends ~1 in 24 generated tokens


def _next(h: int) -> int:
    return (h >> 3) % VOCAB


class Sim:
    """Runs a Scheduler as the engine does. The fake device's K/V slot holds the hash of the prefix its
    position was computed for, so any read of a page written for another prefix, or overwritten while
    shared, shows. The fake model's next token is a function of that hash (deterministic), so every
    sequence has one true continuation to check against."""

    def __init__(self, sched: Scheduler, stop: int = STOP):
        self.sched, self.ps, self.stop = sched, sched.pool.page_size, stop
        self.kv = collections.defaultdict(lambda: [None] * self.ps)
        self.truth, self.hashes = {}, {}
        self.pending, self.sampled = [], {}
        self.finished, self.steps = [], 0

    def add(self, seq):
        self.truth[seq], self.hashes[seq] = [], []
        self.sched.add(seq)

    def _extend(self, seq, n):
        truth, hashes = self.truth[seq], self.hashes[seq]
        while len(truth) < n:
            p = len(truth)
            truth.append(seq.tokens[p] if p < seq.prompt_len else _next(hashes[-1]))
            hashes.append(hash((hashes[-1] if hashes else 17, truth[-1])) & (2**61 - 1))

    def step(self):
        plan = self.sched.schedule()
        self.steps += 1
        assert plan.num_tokens <= self.sched.token_budget
        for seq in plan.preempted:
            assert seq.state == "waiting" and seq.num_scheduled == 0 and not seq.pages
        sampled = {}
        for e in plan.entries:  # writes: all of a call's K/V land before its attention reads
            seq, end = e.seq, e.start + e.count
            assert e.count >= 1 and len(seq.pages) * self.ps >= end and end <= seq.limit
            self._extend(seq, end + 1)
            for p in range(e.start, end):
                if p >= len(seq.tokens):  # fed from the previous call's output for this sequence
                    assert p == e.start and self.sampled.get(seq) == (seq.epoch, p)
                else:
                    assert seq.tokens[p] == self.truth[seq][p]
                self.kv[seq.pages[p // self.ps]][p % self.ps] = self.hashes[seq][p]
            if e.samples:
                sampled[seq] = (seq.epoch, end)
        for e in plan.entries:  # reads: every position the entry attends to holds this prefix's K/V
            seq = e.seq
            for p in range(e.start + e.count):
                assert self.kv[seq.pages[p // self.ps]][p % self.ps] == self.hashes[seq][p], (seq.rid, p)
        self._read(self.pending)
        self.pending = [(seq, epoch, end, self.truth[seq][end]) for seq, (epoch, end) in sampled.items()]
        self.sampled = sampled
        check_invariants(self.sched)
        return plan

    def _read(self, outputs):
        for seq, epoch, position, token in outputs:
            if seq.state != "running" or epoch != seq.epoch:
                continue  # aborted, or preempted since: the output belongs to no one
            assert position == len(seq.tokens)
            seq.tokens.append(token)
            generated = len(seq.tokens) - seq.prompt_len
            if token == self.stop or generated >= seq.max_tokens:
                self.sched.finish(seq)
                self.finished.append(seq)

    def busy(self):
        return bool(self.sched.waiting or self.sched.running or self.pending)


def check_invariants(sched: Scheduler):
    pool, ps = sched.pool, sched.pool.page_size
    owners = collections.Counter(p for s in sched.running for p in s.pages)
    assert all(pool.refcount(p) == owners.get(p, 0) for p in range(pool.num_pages))
    assert pool.num_used == len(owners) and pool.num_free + pool.num_cached + pool.num_used == pool.num_pages
    free, lru = set(pool._free), set(pool._lru)
    assert len(free) == pool.num_free and not free & lru and not free & set(owners) and not lru & set(owners)
    assert all(not pool.registered(p) for p in free) and all(pool.registered(p) for p in lru)
    assert len(sched.running) <= sched.max_num_seqs
    for queue in (list(sched.waiting), sched.running):
        assert [s.arrival for s in queue] == sorted(s.arrival for s in queue)
    for s in sched.running:
        assert s.state == "running" and len(set(s.pages)) == len(s.pages) <= sched.pages_per_seq
        assert len(s.pages) * ps >= s.num_scheduled
        for i, page in enumerate(s.pages):
            if owners[page] > 1:  # shared: a registered full page nobody writes any more
                assert pool.registered(page) and (i + 1) * ps <= s.num_scheduled
    assert all(s.state == "waiting" and not s.pages for s in sched.waiting)


def run_workload(sched, arrivals, *, rng=None, abort_rate=0.0, stop=STOP, max_steps=20000):
    """arrivals: {step: [Seq]}; returns the Sim once every sequence is done."""
    sim = Sim(sched, stop)
    everyone = [s for batch in arrivals.values() for s in batch]
    idle = 0  # steps in a row that planned nothing with nothing in flight
    while sim.steps < max_steps:
        for seq in arrivals.get(sim.steps, []):
            sim.add(seq)
        if rng is not None and rng.random() < abort_rate:
            alive = [s for s in everyone if s.state in ("waiting", "running")]
            if alive:
                sched.abort(rng.choice(alive))
        plan = sim.step()
        if not sim.busy() and sim.steps > max(arrivals, default=0):
            break
        # One such step is normal (a sequence at its limit waits for the engine to read its last token).
        idle = 0 if plan.entries or sim.pending else idle + 1
        assert idle < 2 or not (sched.waiting or sched.running), "no progress"
    assert not sim.busy(), f"not done after {max_steps} steps"
    for seq in everyone:
        assert seq.state == "done"
        sim._extend(seq, len(seq.tokens))
        assert seq.tokens == sim.truth[seq][:len(seq.tokens)]  # prompt + the one true continuation
    return sim


def test_sequences_that_fit_max_model_len_always_finish_in_a_pool_of_one():
    sched = make(num_pages=8, page_size=4, max_model_len=32, max_num_seqs=4, token_budget=8)
    seqs = [Seq(i, [1 + i % 3] * n, max_tokens=32 - n) for i, n in enumerate([3, 17, 30, 1, 9, 25])]
    sim = run_workload(sched, {0: seqs[:4], 3: seqs[4:]}, stop=-1)  # no stop token: all grow to 32
    assert [len(s.tokens) for s in seqs] == [32] * 6 and sim.finished and sched.preemptions_total > 0


def random_run(seed: int, *, prefix_caching: bool, pressure: bool):
    """300 requests arriving at random over 1,500 steps (shared prefixes, random lengths, stop tokens,
    aborts, prompt-logprob requests) on a random configuration; `pressure`: a pool of one max_model_len
    sequence and a few pages more."""
    rng = random.Random(seed)
    page_size, max_model_len, max_num_seqs = rng.choice([2, 4, 8]), rng.choice([32, 64, 96]), rng.randint(2, 8)
    pages_per_seq = max_model_len // page_size
    sched = make(num_pages=pages_per_seq + (rng.randint(0, 4) if pressure else rng.randint(0, 3 * pages_per_seq)),
                 page_size=page_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                 token_budget=max_num_seqs + rng.randint(0, 24), decode_reserve=rng.randint(0, 2),
                 prefix_caching=prefix_caching)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 40))] for _ in range(4)]
    arrivals = collections.defaultdict(list)
    for rid in range(300):
        prompt = rng.choice(prefixes) + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 30))]
        prompt = prompt[:max_model_len - 1]
        seq = Seq(rid, prompt, rng.randint(1, max_model_len - len(prompt)), reuse_prefix=rng.random() > 0.1)
        arrivals[rng.randrange(1500)].append(seq)
    if seed % 2 == 0:  # program widths as the engine's ladder (4, 6, 8, 12, ...): plans get trimmed to them
        sched.widths = sorted({w for k in range(2, 8) for w in (1 << k, 3 << (k - 1))
                               if w < sched.token_budget} | {sched.token_budget})
    return sched, run_workload(sched, arrivals, rng=rng, abort_rate=0.01)


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_keep_the_invariants_and_finish(seed):
    pressure = seed % 2 == 1
    sched, sim = random_run(seed, prefix_caching=seed != 4, pressure=pressure)
    assert sim.steps >= 1500 and len(sim.finished) > 250
    if pressure:
        assert sched.preemptions_total > 0
    if seed != 4:
        assert sched.prefix_hit_requests_total > 0 and sched.prefix_hit_tokens_total > 0
    else:
        assert sched.prefix_hit_requests_total == 0 and sched.pool.num_cached == 0
