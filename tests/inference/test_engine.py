"""The continuous-batching engine (inference/engine/): token-for-token parity with transformers' generate
on each prompt alone under a mixed workload (more requests than slots, arrivals while others decode,
chunked prefill, stop tokens, stop strings, max tokens), no recompilation in steady state, a sequence's
pages freed the step its stop is read, int8 weights and int8 KV cache, EOS never in a completion,
Generator on the engine, a bad request failing alone while the engine keeps serving, a fatal loop error
failing every request and calling on_fatal, and the metrics' memory staying bounded. (The paged pool's
own acceptance tests -- preemption, prefix caching, 48 requests -- are in test_paged_engine.py.)"""


import collections
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from inference import Generator, generate, quantize_model
from inference.engine import Engine, EngineError, EngineFull, Request
from jaxmodel import from_pretrained
from jaxmodel.model import unstack_layers

from .conftest import count_compiles, left_pad, random_prompts

N_REQUESTS = 36
SLOTS = 4


def _hf(hf_model, prompt, max_new, eos=None, stop_strings=None, tokenizer=None):
    ids = torch.as_tensor(np.asarray(prompt)[None])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                eos_token_id=eos, pad_token_id=3, stop_strings=stop_strings, tokenizer=tokenizer)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def workload(tiny_model, hf_model, tokenizer):
    """36 requests: prompt lengths from 2 to 300 (beyond the 64-token prefill chunk: chunked), 1-24 new
    tokens, and a third each ending by max_tokens, a stop token set, or a stop string; the expected
    tokens come from transformers' generate on each prompt alone with the same stop condition."""
    rng = np.random.default_rng(21)
    vocab = tiny_model.config.vocab_size
    lengths = [int(x) for x in rng.choice([2, 5, 9, 17, 33, 60, 64, 65, 130, 300], size=N_REQUESTS)]
    prompts = random_prompts(vocab, lengths, seed=22)
    cases = []
    for i, prompt in enumerate(prompts):
        max_new = int(rng.integers(1, 25))
        free = _hf(hf_model, prompt, max_new)
        kind = ("length", "stop_ids", "stop_string")[i % 3]
        stop_ids, stop_strings = (), ()
        if kind == "stop_ids" and len(free) > 2:  # a token the row emits mid-way, plus never-emitted ids
            stop_ids = (free[len(free) // 2],) + tuple(t for t in range(4, vocab) if t not in free)[:10]
            expected = _hf(hf_model, prompt, max_new, eos=list(stop_ids))
        elif kind == "stop_string" and len(free) > 2:  # a piece of the text the row produces
            text = tokenizer.decode(free[: len(free) // 2 + 1], skip_special_tokens=True)
            clean = len(text) >= 2 and "\ufffd" not in text  # not inside an unfinished UTF-8 character
            stop_strings = (text[-2:],) if clean else ()
            expected = _hf(hf_model, prompt, max_new, stop_strings=list(stop_strings), tokenizer=tokenizer) \
                if stop_strings else free
        else:
            expected = free
        cases.append(dict(prompt=prompt.tolist(), max_new=max_new, stop_ids=stop_ids, stop_strings=stop_strings,
                          expected=expected))
    assert sum(len(c["expected"]) < c["max_new"] for c in cases) >= 8, "the workload should stop early often"
    return cases


def _decode_fn(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def test_engine_greedy_matches_transformers_each_prompt_alone(tiny_model, tokenizer, workload):
    engine = Engine(tiny_model, slots=SLOTS, max_model_len=512, prefill_chunk=64, decode=_decode_fn(tokenizer))
    plans = []  # the scheduler's plans, as the engine sent them (spied, not replaced)
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    requests = [Request(c["prompt"], max_tokens=c["max_new"], stop_ids=frozenset(c["stop_ids"]),
                        stop_strings=c["stop_strings"]) for c in workload]
    for r in requests[:8]:  # more requests than slots from the start
        engine.submit(r)
    pending, steps, seen_mixed = requests[8:], 0, False
    while not all(r.finished for r in requests):
        engine.step()
        steps += 1
        # A sequence whose stop was read this step has already given up its place and pages.
        assert all(not r.finished for r in engine.running)
        kinds = {e.count == 1 and e.start >= e.seq.prompt_len for e in plans[-1].entries}
        seen_mixed |= kinds == {True, False}  # decode tokens and a prompt chunk in one call
        if pending and steps % 3 == 0:  # arrivals while others decode
            for _ in range(2):
                if pending:
                    engine.submit(pending.pop(0))
    assert seen_mixed, "a prompt should have been prefilled in chunks while other sequences decoded"
    for i, (r, c) in enumerate(zip(requests, workload)):
        assert r.tokens == c["expected"], f"request {i} (prompt {len(c['prompt'])} tokens, stop {c['stop_ids'][:1]}" \
                                          f" {c['stop_strings']}): {r.tokens} != {c['expected']}"
        if c["stop_strings"] and len(r.tokens) < c["max_new"]:
            full = tokenizer.decode(r.tokens, skip_special_tokens=True)
            assert r.finish_reason == "stop" and r.text == full[: full.find(c["stop_strings"][0])]
        else:
            assert r.text == tokenizer.decode(r.tokens, skip_special_tokens=True)
    metrics = engine.metrics()
    assert metrics["finished_requests_total"] == N_REQUESTS and engine.active_slots == 0
    # Every prompt token went through a call (no two prompts here share a full page), padding not counted.
    prompts = sum(len(c["prompt"]) for c in workload)
    assert metrics["prompt_tokens_total"] == prompts and metrics["prefill_tokens_total"] >= prompts
    assert metrics["kv_pages_free"] + metrics["kv_pages_cached"] == metrics["kv_pages_total"]


def test_no_recompilation_in_steady_state(tiny_model):
    """After warmup, greedy, sampled, top-logprob and echo (prompt logprobs) requests of every length
    compile nothing: neither jit's caches grow nor does XLA compile (counted by the engine too)."""
    engine = Engine(tiny_model, slots=SLOTS, max_model_len=512, prefill_chunk=128)
    steps = (engine._step_fn,)  # jitted once per model and pool format: shared by engines
    cached = sum(step._cache_size() for step in steps)  # programs earlier tests' engines compiled
    shapes = engine.warmup()
    # with and without prompt logprobs, one program per token width: 16, 24, ..., 128, then the step's
    # budget (128 + 4 rows, rounded up to 8); sampling and top logprobs are run-time flags
    assert engine.widths == [16, 24, 32, 48, 64, 96, 128, 136] and shapes == 2 * 8
    sizes = tuple(step._cache_size() for step in steps)
    warm = engine.metrics()["compiles_total"]
    assert warm == sum(sizes) - cached  # each program this warmup added compiled once, and counted
    rng = np.random.default_rng(5)
    vocab = tiny_model.config.vocab_size
    with count_compiles() as compiles:
        for wave in range(2):
            lengths = rng.integers(1, 200, size=12)
            reqs = []
            for i, (p, s) in enumerate(zip(random_prompts(vocab, lengths, seed=wave), rng.integers(4, vocab, size=12))):
                kind = i % 4  # greedy, sampled with top-logprobs, echo + logprobs, sampled echo
                reqs.append(Request(p.tolist(), max_tokens=int(rng.integers(0 if kind >= 2 else 1, 12)),
                                    stop_ids=frozenset({int(s)}), temperature=0.8 * (kind % 2), top_k=20, top_p=0.9,
                                    seed=i, logprobs=5 * (kind >= 1), prompt_logprobs=kind >= 2))
            engine.run(reqs)
    assert tuple(step._cache_size() for step in steps) == sizes
    assert compiles == [], f"{len(compiles)} compilations after warmup"
    assert engine.metrics()["compiles_total"] == warm


def test_a_sequence_that_stops_frees_its_place_in_the_step_that_reads_it(tiny_model):
    engine = Engine(tiny_model, slots=1, max_model_len=64)
    first, second = Request([5, 6, 7], max_tokens=1), Request([8, 9], max_tokens=3)
    engine.submit(first)
    engine.submit(second)
    engine.step()  # first's prompt goes out; its token is read one step late, while the next call runs
    assert not first.finished and engine.running == [first] and engine.queue_depth == 1
    engine.step()  # nothing more to compute for first (max_tokens=1): its token is read, place freed at once
    assert first.finished and first.finish_reason == "length" and len(first.tokens) == 1
    assert engine.running == [] and engine.queue_depth == 1 and engine.metrics()["kv_pages_free"] == engine.num_pages
    engine.step()  # second is admitted; its prompt goes out
    assert engine.running == [second] and second.tokens == []
    engine.step()  # its first decode goes out (fed the prompt call's token on the device), that token is read
    assert len(second.tokens) == 1
    while not second.finished:
        engine.step()
    # max_tokens: no sequence is computed past it (one decode call per token after the first), and first
    # (max_tokens=1) never needed a decode call at all
    assert len(second.tokens) == 3 and engine.decode_steps == 2 and engine.idle()


def test_cancel_and_queue_bound(tiny_model):
    engine = Engine(tiny_model, slots=1, max_model_len=64, max_queue=2)
    a, b = engine.submit(Request([5, 6], max_tokens=30)), engine.submit(Request([7], max_tokens=30))
    with pytest.raises(EngineFull, match="queue is full"):
        engine.submit(Request([9], max_tokens=3))
    engine.step()
    engine.step()
    engine.cancel(a)
    engine.step()  # a's place goes to b in the same step
    assert a.finish_reason == "abort" and engine.running == [b] and engine.queue_depth == 0
    with pytest.raises(EngineError, match="exceeds max_model_len=64"):
        engine.submit(Request(list(range(4, 60)), max_tokens=10))
    with pytest.raises(EngineError, match="out of range"):
        engine.submit(Request([10**6], max_tokens=1))


def test_int8_weights_and_int8_cache_in_the_engine(tiny_dir, tiny_model):
    """int8 weights: the engine gives the static path's tokens. int8 weights and KV cache: the engine's
    log-probabilities of its own tokens agree with an uncached float forward of the whole sequence."""
    int8 = quantize_model(from_pretrained(tiny_dir, progress=False))
    prompts = random_prompts(tiny_model.config.vocab_size, (4, 40, 90, 7, 23), seed=9)
    static = generate(int8, *left_pad(prompts), max_new_tokens=10).tolist()  # (batched == each alone: test_generate)
    engine = Engine(int8, slots=2, max_model_len=128, prefill_chunk=32)
    assert [r.tokens for r in engine.run([Request(p.tolist(), max_tokens=10) for p in prompts])] == static

    engine = Engine(int8, slots=2, max_model_len=128, prefill_chunk=32, kv_cache_dtype="int8")
    assert all(leaf.dtype == np.int8 for leaf in jax.tree.leaves(engine.pages.kv))
    reqs = engine.run([Request(p.tolist(), max_tokens=10) for p in prompts])
    graphdef, state = nnx.split(int8)
    worst = 0.0
    for p, r in zip(prompts, reqs):
        ids = np.concatenate([p, r.tokens])[None]
        logp = np.asarray(jax.nn.log_softmax(nnx.merge(graphdef, state)(ids), -1))[0]
        ref = logp[len(p) - 1 + np.arange(len(r.tokens)), r.tokens]
        worst = max(worst, float(np.abs(ref - np.asarray(r.token_logprobs)).max()))
    assert worst <= 2e-2, f"int8 cache: max |dlogprob| {worst:.2e}"


def test_generator_on_the_engine_no_special_tokens_and_input_order(tiny_dir, tiny_model, tokenizer):
    gen = Generator.from_pretrained(tiny_dir, dtype="float32", tokenizer=tokenizer)
    gen.slots = 2
    prompts = ["Hei på deg", "Engelsk: I like cheese.\nBokmål:", "Nordavind og sol", "x", "Engelsk: Where"]
    encoded = gen.encode(prompts)
    expected = [generate(tiny_model, *left_pad([np.array(e)]), max_new_tokens=6)[0].tolist() for e in encoded]
    texts = gen.generate(prompts, max_new_tokens=6, stop=[])  # EOS only (never emitted by this model)
    assert texts == [tokenizer.decode(e, skip_special_tokens=True).strip() for e in expected]
    # A model whose first choice is EOS: the completion is empty (no "</s>"), and it stops there. The EOS
    # column of lm_head becomes twice the column of the token the model picks first for this prompt (its
    # logit is the largest, hence positive, so EOS's is larger still).
    eos = tokenizer.eos_token_id
    model = from_pretrained(tiny_dir, progress=False)
    first = generate(model, np.array([gen.encode(["Hei"])[0]]), max_new_tokens=1)[0, 0]
    w = np.array(model.lm_head[...])
    w[:, eos] = 2 * w[:, first]
    model.lm_head[...] = jnp.asarray(w)
    eos_gen = Generator(model, tokenizer, slots=2)
    r = eos_gen.requests(eos_gen.encode(["Hei"]), max_new_tokens=5)[0]
    eos_gen.engine_for(16).run([r])
    assert r.tokens == [eos] and r.text == "" and r.finish_reason == "stop"
    assert eos_gen.generate(["Hei"], max_new_tokens=5) == [""]
    # iter_records: input order, groups of batch_size.
    records = [{"text": p, "id": i} for i, p in enumerate(prompts)]
    groups = list(gen.iter_records(records, max_new_tokens=6, stop=[], batch_size=2))
    assert [len(g) for g in groups] == [2, 2, 1]
    assert [x["id"] for g in groups for x in g] == list(range(5))
    assert [x["output"] for g in groups for x in g] == texts


def test_engine_on_a_mesh_matches_one_device(tiny_dir, tiny_model):
    from jaxmodel.sharding import make_mesh

    mesh = make_mesh((4, 1, 2))  # heads over tensor (2 divides the 2 KV heads: the pool is split too)
    model = unstack_layers(from_pretrained(tiny_dir, mesh=mesh, progress=False))  # as Generator runs on CPU
    q_proj = model.layers[0].self_attn.q_proj[...]
    assert q_proj.sharding.mesh.shape["tensor"] == 2 and q_proj.sharding.spec[1] == "tensor"  # heads, kept
    prompts = random_prompts(tiny_model.config.vocab_size, (4, 40, 9, 23, 70), seed=13)
    single = Engine(tiny_model, slots=2, max_model_len=128, prefill_chunk=32)
    sharded = Engine(model, slots=2, max_model_len=128, prefill_chunk=32)
    expected = [r.tokens for r in single.run([Request(p.tolist(), max_tokens=8) for p in prompts])]
    assert [r.tokens for r in sharded.run([Request(p.tolist(), max_tokens=8) for p in prompts])] == expected
    kv = sharded.pages.kv
    assert isinstance(kv, tuple) and len(kv) == model.config.num_hidden_layers  # per layer
    assert kv[0].sharding.mesh.shape["tensor"] == 2 and "tensor" in kv[0].sharding.spec  # pages over kv heads


def test_prompt_logprobs_across_ragged_calls_and_chunks_equal_transformers(tiny_model, hf_model):
    """Prompt log-probabilities (what echo + logprobs asks for) of prompts sharing a call and of long
    prompts prefilled in chunks over several calls equal transformers' log-softmax of the whole prompt,
    with the top alternatives."""
    engine = Engine(tiny_model, slots=4, max_model_len=128, prefill_chunk=16)
    prompts = random_prompts(tiny_model.config.vocab_size, [5, 40, 9, 23, 3], seed=11)
    requests = [Request(p.tolist(), max_tokens=0, prompt_logprobs=True) for p in prompts]
    engine.run(requests)
    for p, r in zip(prompts, requests):
        with torch.no_grad():
            logits = hf_model(torch.as_tensor(p[None].astype(np.int64))).logits[0].double()
        logp = torch.log_softmax(logits, -1).numpy()
        expected = logp[np.arange(len(p) - 1), p[1:]]
        np.testing.assert_allclose(r.prompt_token_logprobs, expected, atol=1e-4)
        best = np.argsort(-logp[:-1], axis=-1)[:, :5]
        assert [[t for t, _ in alts] for alts in r.prompt_top_logprobs] == best.tolist()
        assert r.finish_reason == "length" and r.tokens == []


# -- faults and bounded metrics -------------------------------------------------------------------------


def _reference(model, prompt, max_new):
    return generate(model, *left_pad([np.asarray(prompt)]), max_new_tokens=max_new)[0].tolist()


def test_a_bad_request_fails_alone_and_the_engine_keeps_serving(tiny_model):
    """A Request the engine's int32 arrays cannot hold (top_k=2**40, as no HTTP door would let through) is
    refused at submit; one changed to that after submit fails alone inside the loop (finish_reason
    "error", the field named), as does one whose callback raises; the others get the reference tokens
    and the loop keeps serving."""
    vocab = tiny_model.config.vocab_size
    p, q, r = (x.tolist() for x in random_prompts(vocab, (7, 12, 5), seed=31))
    engine = Engine(tiny_model, slots=2, max_model_len=64)
    with pytest.raises(EngineError, match=r"top_k=1099511627776 is out of range \[0, 2147483648\)"):
        engine.submit(Request(p, max_tokens=4, top_k=2**40))
    for field, value in (("temperature", float("nan")), ("top_p", 0.0), ("logprobs", 6), ("stream_id", -1),
                         ("max_tokens", 2.5), ("seed", "7")):
        with pytest.raises(EngineError, match=field):
            engine.submit(Request(p, **{"max_tokens": 4, field: value}))

    def broken_callback(request):
        raise RuntimeError("the client's callback broke")

    good = engine.submit(Request(p, max_tokens=8))
    changed = engine.submit(Request(q, max_tokens=8, temperature=0.7, top_k=5))
    changed.top_k = 2**40  # after the check at submit: the engine meets it when it admits the request
    callback = engine.submit(Request(r, max_tokens=8, on_update=broken_callback))
    engine.start()
    try:
        assert good.done.wait(120) and changed.done.wait(120) and callback.done.wait(120)
        assert changed.finish_reason == "error" and changed.tokens == []
        assert changed.error == "EngineError: top_k=1099511627776 is out of range [0, 2147483648)"
        assert callback.finish_reason == "error" and callback.error == "RuntimeError: the client's callback broke"
        assert good.finish_reason == "length" and good.tokens == _reference(tiny_model, p, 8)
        after = engine.submit(Request(q, max_tokens=6))  # still serving
        assert after.done.wait(120) and after.tokens == _reference(tiny_model, q, 6)
        assert engine._thread.is_alive() and engine.fatal is None
        assert engine.metrics()["failed_requests_total"] == 2
    finally:
        engine.stop()


def test_a_fatal_loop_error_finishes_every_request_with_an_error_and_calls_on_fatal(tiny_model):
    """A failure that is no request's fault (the device's cache buffers gone: the next call raises) stops
    the loop: the running and the queued requests all finish with an error (nobody waits forever),
    on_fatal gets the exception from the engine's thread, and later submits are refused."""
    vocab = tiny_model.config.vocab_size
    fatal = []
    engine = Engine(tiny_model, slots=1, max_model_len=64,
                    on_fatal=lambda e: fatal.append((e, threading.current_thread().name)))
    reqs = [engine.submit(Request(p.tolist(), max_tokens=20)) for p in random_prompts(vocab, (6, 9, 4), seed=8)]
    engine.step()
    engine.step()  # the first request decodes, the two others wait for its slot
    assert len(reqs[0].tokens) >= 1 and engine.queue_depth == 2
    for leaf in jax.tree.leaves(engine.pages):
        leaf.delete()
    engine.start()
    assert all(r.done.wait(120) for r in reqs)
    engine._thread.join(120)
    assert not engine._thread.is_alive()
    assert [r.finish_reason for r in reqs] == ["error"] * 3
    assert all(r.error.startswith("the engine stopped: RuntimeError: ") for r in reqs), reqs[0].error
    assert len(fatal) == 1 and isinstance(fatal[0][0], RuntimeError) and fatal[0][1] == "engine"
    assert engine.fatal is fatal[0][0] and engine.idle()
    with pytest.raises(EngineError, match="the engine stopped: RuntimeError"):
        engine.submit(Request([5, 6], max_tokens=2))
    engine.stop()


def test_token_rate_memory_stays_bounded_and_metrics_stay_right(tiny_model):
    """Over a thousand generated tokens with nobody reading the metrics: no container of the engine grows
    (but the TTFT samples, at most 1000), and then tokens/s and the counts agree with a count kept by
    the requests' own callbacks."""
    vocab = tiny_model.config.vocab_size
    engine = Engine(tiny_model, slots=4, max_model_len=128)
    seen = []  # (time, new tokens) from each request's callback, independent of the engine's counting

    def batch(n, max_new, seed):
        reported = {}  # request -> tokens it had at its callback's last call

        def record(r):
            seen.append((time.perf_counter(), len(r.tokens) - reported.get(id(r), 0)))
            reported[id(r)] = len(r.tokens)

        reqs = [Request(p.tolist(), max_tokens=max_new, on_update=record)
                for p in random_prompts(vocab, [5] * n, seed=seed)]
        return engine.run(reqs)

    def sizes():
        return {k: len(v) for part in (engine, engine.stats) for k, v in vars(part).items()
                if isinstance(v, (list, dict, collections.deque)) and k != "ttft"}

    first = batch(8, 40, seed=1)
    before = sizes()
    second = batch(8, 100, seed=2)
    assert sizes() == before
    assert engine.stats.ttft.maxlen == 1000 and len(engine.stats.ttft) == 16
    t0 = time.perf_counter()
    m = engine.metrics()
    t1 = time.perf_counter()
    total = sum(len(r.tokens) for r in first + second)
    assert total == 8 * 40 + 8 * 100 == sum(n for _, n in seen)
    assert m["generated_tokens_total"] == total and m["finished_requests_total"] == 16
    # tokens/s counts the tokens of the last 9.9-10 s; a callback runs just after its token is counted
    surely_in = sum(n for t, n in seen if t > t1 - 9.4)
    maybe_in = sum(n for t, n in seen if t > t0 - 10.0)
    assert surely_in <= round(m["tokens_per_second"] * 10) <= maybe_in, (surely_in, m["tokens_per_second"], maybe_in)
