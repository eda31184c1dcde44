"""The engine on a paged KV cache (issue 25's acceptance): greedy outputs equal transformers' generate on
each prompt alone for 48 requests with mixed lengths, stop conditions and shared prefixes through a pool
smaller than the workload (preemptions happen and are counted); a shared few-shot prefix is prefilled once
(prefilled tokens < 30% of the prompts', outputs identical with prefix caching off); after warmup() a
mixed workload (sampling, logprobs, echo, preemption, prefix hits) compiles nothing, and sampled tokens
do not change when a sequence is preempted and recomputed; a pool that cannot hold one max_model_len
sequence is refused before anything is built."""

import numpy as np
import pytest
import torch

from inference.engine import Engine, EngineError, Request

from .conftest import count_compiles, random_prompts

N_REQUESTS = 48


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def _hf(hf_model, prompt, max_new, eos=None, stop_strings=None, tokenizer=None):
    ids = torch.as_tensor(np.asarray(prompt)[None])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                eos_token_id=eos, pad_token_id=3, stop_strings=stop_strings, tokenizer=tokenizer)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def workload(tiny_model, hf_model, tokenizer):
    """48 requests, transformers' tokens for each alone: prompts of 2 to 200 tokens, a third of them
    starting with one of three shared prefixes (40, 75 and 130 tokens: one per 16 requests) and ending by
    max_tokens (40), the others by a stop token set or a stop string in turn (1-20 new tokens at most)."""
    rng = np.random.default_rng(25)
    vocab = tiny_model.config.vocab_size
    prefixes = random_prompts(vocab, (40, 75, 130), seed=26)
    lengths = rng.choice([2, 7, 15, 16, 17, 33, 64, 90, 150, 200], size=N_REQUESTS)
    cases = []
    for i, prompt in enumerate(random_prompts(vocab, lengths, seed=27)):
        if i % 3 == 0:
            prompt = np.concatenate([prefixes[i // 16], prompt[: int(rng.integers(1, 40))]])
        max_new = int(rng.integers(1, 21)) if i % 3 else 40  # long runs: the pool must run out as they grow
        free = _hf(hf_model, prompt, max_new)
        stop_ids, stop_strings, expected = (), (), free
        if i % 3 == 1 and len(free) > 2:  # a token the sequence emits mid-way: greedy stops at its first
            stop_ids = (free[len(free) // 2],)
            expected = free[: free.index(stop_ids[0]) + 1]
        elif i % 3 == 2 and len(free) > 2:  # a piece of the text it produces
            text = tokenizer.decode(free[: len(free) // 2 + 1], skip_special_tokens=True)
            if len(text) >= 2 and "\ufffd" not in text:
                stop_strings = (text[-2:],)
                expected = _hf(hf_model, prompt, max_new, stop_strings=list(stop_strings), tokenizer=tokenizer)
        cases.append(dict(prompt=prompt.tolist(), max_new=max_new, stop_ids=stop_ids, stop_strings=stop_strings,
                          expected=expected))
    assert sum(len(c["expected"]) < c["max_new"] for c in cases) >= 8, "the workload should stop early often"
    return cases


def _decode_fn(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def test_48_requests_through_a_small_pool_equal_transformers_each_alone(tiny_model, tokenizer, workload):
    """8 sequences at once over 32 pages of 8 tokens (one max_model_len=256 sequence): the workload needs
    more, so sequences are preempted and recomputed; every request's tokens still equal transformers'."""
    engine = Engine(tiny_model, slots=8, max_model_len=256, page_size=8, num_pages=32, prefill_chunk=32,
                    decode=_decode_fn(tokenizer))
    requests = [Request(c["prompt"], max_tokens=c["max_new"], stop_ids=frozenset(c["stop_ids"]),
                        stop_strings=c["stop_strings"]) for c in workload]
    for r in requests[:20]:
        engine.submit(r)
    pending = requests[20:]
    while not all(r.finished for r in requests):
        engine.step()
        if pending:  # arrivals while others run
            engine.submit(pending.pop(0))
    for i, (r, c) in enumerate(zip(requests, workload)):
        assert r.tokens == c["expected"], f"request {i} (prompt {len(c['prompt'])} tokens): {r.tokens} != " \
                                          f"{c['expected']}"
        assert r.finish_reason == ("stop" if len(r.tokens) < c["max_new"] else r.finish_reason), i
    m = engine.metrics()
    assert m["preemptions_total"] > 0, "the pool should have run out"
    assert m["kv_pages_free"] + m["kv_pages_cached"] == m["kv_pages_total"] == 32  # every page given back
    assert m["prefix_hit_requests_total"] > 0 and m["prefix_hit_tokens_total"] >= 16
    assert m["finished_requests_total"] == N_REQUESTS
    engine.step()  # reads the call still in flight, if any (a token past a stop: it belongs to no one)
    assert engine.idle() and engine.metrics()["generated_tokens_total"] == sum(len(r.tokens) for r in requests)


def _five_shot(tokenizer):
    """A fixed 5-shot translation prompt (several hundred tokens) and 16 one-sentence requests after it."""
    pairs = [("I like cheese, but my brother prefers fresh bread with butter and jam.",
               "Jeg liker ost, men broren min foretrekker ferskt brød med smør og syltetøy."),
              ("The weather is nice today, so we are walking to the old harbour after lunch.",
               "Været er fint i dag, så vi går til den gamle havna etter lunsj."),
              ("Where is the train station? I have to catch the early train to Bergen.",
               "Hvor er togstasjonen? Jeg må rekke det tidlige toget til Bergen."),
              ("The north wind and the sun argued about which of them was the strongest.",
               "Nordavinden og sola kranglet om hvem av dem som var den sterkeste."),
              ("Thank you so much for the wonderful dinner yesterday evening.",
               "Tusen takk for den fantastiske middagen i går kveld.")]
    shots = "Oversett fra engelsk til bokmål.\n\n" + "".join(f"Engelsk: {e}\nBokmål: {b}\n\n" for e, b in pairs)
    sentences = [f"Engelsk: {s}\nBokmål:" for s in (
        "I like cheese", "Where is the station?", "The sun is warm", "Hello there", "It is nice today",
        "How are you?", "Where is the cheese?", "The wind is strong", "I like trains", "Good day",
        "Is it cold?", "The station is near", "I am here", "Thanks a lot", "Who is strongest?", "Nice weather")]
    prompts = [tokenizer(shots + s)["input_ids"] for s in sentences]
    return prompts, len(tokenizer(shots)["input_ids"])


def test_a_shared_few_shot_prefix_is_prefilled_once(tiny_model, tokenizer):
    prompts, shared = _five_shot(tokenizer)
    assert shared >= 200, shared
    runs = {}
    for caching in (True, False):
        engine = Engine(tiny_model, slots=4, max_model_len=512, page_size=16, prefill_chunk=64,
                        prefix_caching=caching)
        reqs = engine.run([Request(p, max_tokens=6) for p in prompts])
        runs[caching] = ([r.tokens for r in reqs], engine.metrics())
    (cached_tokens, m), (plain_tokens, plain) = runs[True], runs[False]
    total = sum(len(p) for p in prompts)
    assert m["prompt_tokens_total"] == plain["prompt_tokens_total"] == total
    assert m["prefill_tokens_total"] < 0.3 * total, (m["prefill_tokens_total"], total)
    assert m["prefix_hit_requests_total"] >= len(prompts) - 1
    assert plain["prefill_tokens_total"] == total and plain["prefix_hit_tokens_total"] == 0
    assert cached_tokens == plain_tokens


def _mixed(vocab, prefix, seed):
    """Greedy, sampled with top logprobs, echo (prompt logprobs) and sampled echo requests in turn, half of
    them after a shared prefix, 0-40 new tokens."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i, p in enumerate(random_prompts(vocab, rng.integers(1, 100, size=16), seed=seed)):
        kind = i % 4
        prompt = np.concatenate([prefix, p]) if i % 2 else p
        reqs.append(Request(prompt.tolist(), max_tokens=int(rng.integers(0 if kind >= 2 else 1, 41)),
                            temperature=0.8 * (kind % 2), top_k=20, top_p=0.9, seed=i, logprobs=5 * (kind >= 1),
                            prompt_logprobs=kind >= 2))
    return reqs


def test_after_warmup_a_mixed_workload_compiles_nothing_and_preemption_keeps_samples(tiny_model):
    """A warmed engine with a small pool over greedy, sampled, top-logprob and echo requests (preemptions,
    prefix hits) compiles nothing; its tokens equal those of each request run alone on it (no preemption
    then: the pool holds one max_model_len sequence; sampling keys follow the token index, so a recomputed
    sequence draws the same tokens)."""
    vocab = tiny_model.config.vocab_size
    prefix = random_prompts(vocab, (70,), seed=40)[0]
    engine = Engine(tiny_model, slots=4, max_model_len=256, page_size=8, num_pages=32, prefill_chunk=16)
    programs = engine.warmup()
    assert programs == 2 * len(engine.widths) and engine.widths == [16, 24]
    warm = engine.compiles
    assert warm > 0
    with count_compiles() as compiles:
        together = engine.run(_mixed(vocab, prefix, seed=41) + _mixed(vocab, prefix, seed=42))
        m = engine.metrics()
        assert m["preemptions_total"] > 0 and m["prefix_hit_requests_total"] > 0
        alone = [engine.run([r])[0] for r in _mixed(vocab, prefix, seed=41) + _mixed(vocab, prefix, seed=42)]
    assert compiles == [], f"{len(compiles)} compilations after warmup"
    after = engine.metrics()
    assert after["compiles_total"] == warm and after["preemptions_total"] == m["preemptions_total"]
    for a, b in zip(together, alone):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.prompt_token_logprobs, b.prompt_token_logprobs, atol=1e-4)
        assert len(a.prompt_token_logprobs) == (len(a.prompt) - 1 if a.prompt_logprobs else 0)
        assert [len(x) for x in a.top_logprobs] == ([a.logprobs] * len(a.tokens) if a.logprobs else [])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_pages=3), r"num_pages=3 gives 3 KV cache pages of 16 tokens \(\d+ bytes each\): one "
                        r"max_model_len=64 sequence needs 4"),
    (dict(kv_cache_memory=1000), r"kv_cache_memory=1000 bytes gives 0 KV cache pages"),
    (dict(kv_cache_memory=1.5), r"kv_cache_memory=1.5 must be a fraction in \(0, 1\] or a number of bytes"),
    (dict(num_pages=8, kv_cache_memory=0.5), "give num_pages or kv_cache_memory, not both"),
    (dict(page_size=0), "page_size=0 must be positive"),
], ids=["pages", "bytes", "fraction", "both", "page_size"])
def test_a_pool_that_cannot_hold_one_sequence_is_refused_before_it_is_built(tiny_model, kwargs, message):
    with pytest.raises(EngineError, match=message):
        Engine(tiny_model, slots=2, max_model_len=64, **kwargs)
