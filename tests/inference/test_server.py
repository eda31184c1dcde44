"""`normistral serve`: a real server subprocess on localhost (one for this module), driven by the official
`openai` client: completions vs transformers, streaming == non-streamed, logprobs/echo vs the model's own
log-softmax, 64 concurrent clients, bad requests (4xx, server still healthy), a disconnected stream
freeing its slot, overload answered 429, and the models / health / metrics endpoints."""

import asyncio
import json
import os
import re
import time

import httpx
import jax
import numpy as np
import openai
import pytest
import torch

from tests.inference.serving import start_serve, stop_serve

NAME = "tiny"
SLOTS = 4
MAX_LEN = 256
MAX_QUEUE = 80


@pytest.fixture(scope="module")
def server(tiny_dir):
    proc, base, log = start_serve(tiny_dir, os.path.join(os.path.dirname(tiny_dir), "server.log"), "--slots",
                                  str(SLOTS), "--max-model-len", str(MAX_LEN), "--dtype", "float32",
                                  "--served-model-name", NAME, "--max-queue", str(MAX_QUEUE), "--prefill-chunk", "64")
    yield base
    stop_serve(proc, log)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def _hf_greedy(hf_model, ids, max_new, eos):
    ids = torch.as_tensor(np.asarray(ids)[None])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                eos_token_id=eos, pad_token_id=3)
    return out[0, ids.shape[1]:].tolist()


def _metrics(server) -> dict:
    text = httpx.get(server + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^normistral_(\w+) (\S+)$", text, re.M)}


PROMPTS = ["Engelsk: I like cheese.\nBokmål:", "Hei på deg, hvordan", "Nordavind og sol", "Where is"]


def test_completions_match_transformers(client, hf_model, tokenizer):
    for prompt in PROMPTS:
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        ids = tokenizer(prompt)["input_ids"]
        expected = _hf_greedy(hf_model, ids, 12, tokenizer.eos_token_id)
        choice = out.choices[0]
        assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if len(expected) < 12 else "length")
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(expected)
        assert out.model == NAME and out.object == "text_completion"
    batch = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=5, temperature=0)
    single = [client.completions.create(model=NAME, prompt=p, max_tokens=5, temperature=0).choices[0].text
              for p in PROMPTS[:2]]
    assert [c.index for c in batch.choices] == [0, 1] and [c.text for c in batch.choices] == single


def test_streaming_concatenates_to_the_plain_completion(client):
    for kwargs in (dict(max_tokens=20), dict(max_tokens=40, stop=["er", "\n"]), dict(max_tokens=30, seed=7,
                                                                                   temperature=0.8)):
        plain = client.completions.create(model=NAME, prompt=PROMPTS[1], temperature=kwargs.pop("temperature", 0),
                                          **kwargs)
        stream = client.completions.create(model=NAME, prompt=PROMPTS[1], stream=True,
                                           temperature=0.8 if "seed" in kwargs else 0, **kwargs)
        chunks = list(stream)
        assert len(chunks) >= 2
        assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
        assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
        if "stop" in kwargs and plain.choices[0].finish_reason == "stop":
            assert not any(s in plain.choices[0].text for s in kwargs["stop"])


def test_logprobs_and_echo_equal_the_models_log_softmax(client, tiny_model, tokenizer):
    prompt = PROMPTS[0]
    ids = tokenizer(prompt)["input_ids"]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt
    assert lp.tokens == [tokenizer.decode([i]) for i in ids] and lp.token_logprobs[0] is None
    logp = np.asarray(jax.nn.log_softmax(tiny_model(np.array([ids])), -1))[0]  # [T, V], float32
    expected = logp[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-4)
    for t, top in enumerate(lp.top_logprobs[1:]):
        best = np.sort(logp[t])[::-1][:2]
        np.testing.assert_allclose(sorted(top.values(), reverse=True), best, atol=1e-4)
    # Generated tokens' logprobs, after the echoed prompt's.
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, echo=True, logprobs=1, temperature=0)
    lp = out.choices[0].logprobs
    gen_ids = _GREEDY[prompt][: out.usage.completion_tokens]
    assert out.choices[0].text == prompt + tokenizer.decode(gen_ids, skip_special_tokens=True)
    assert len(lp.tokens) == len(ids) + len(gen_ids) and lp.text_offset[len(ids)] == len(prompt)
    logp = np.asarray(jax.nn.log_softmax(tiny_model(np.array([ids + gen_ids])), -1))[0]
    expected = logp[len(ids) - 1 + np.arange(len(gen_ids)), gen_ids]
    np.testing.assert_allclose(lp.token_logprobs[len(ids):], expected, atol=1e-4)
    for top, t in zip(lp.top_logprobs[len(ids):], gen_ids):  # greedy: the chosen token is the top one
        assert list(top) == [tokenizer.decode([t])]


_GREEDY: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _greedy_reference(tiny_model, tokenizer):
    """Greedy ids from the static generate (itself tested against transformers in test_generate)."""
    from inference import generate

    for p in PROMPTS:
        _GREEDY[p] = generate(tiny_model, np.array([tokenizer(p)["input_ids"]]), max_new_tokens=6)[0].tolist()


def test_64_concurrent_clients_no_lost_or_duplicated_responses(server, hf_model, tokenizer):
    rng = np.random.default_rng(4)
    vocab = len(tokenizer)
    prompts = [rng.integers(4, vocab, size=int(rng.integers(2, 40))).tolist() for _ in range(64)]
    max_tokens = [int(x) for x in rng.integers(1, 12, size=64)]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
        calls = [aclient.completions.create(model=NAME, prompt=p, max_tokens=m, temperature=0, logprobs=0)
                 for p, m in zip(prompts, max_tokens)]
        return await asyncio.gather(*calls)

    before = _metrics(server)
    results = asyncio.run(main())
    assert len({r.id for r in results}) == 64  # 64 distinct responses
    for p, m, r in zip(prompts, max_tokens, results):
        expected = _hf_greedy(hf_model, p, m, tokenizer.eos_token_id)
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == len(expected)
        assert r.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    after = _metrics(server)
    assert after["finished_requests_total"] - before["finished_requests_total"] == 64
    assert after["active_slots"] == 0 and after["queue_depth"] == 0


BAD = [
    ("missing prompt", {"model": NAME}, 400, "'prompt' is required"),
    ("prompt type", {"model": NAME, "prompt": {"text": "x"}}, 400, "'prompt' must be"),
    ("empty prompt list", {"model": NAME, "prompt": []}, 400, "'prompt' must be"),
    ("token id range", {"model": NAME, "prompt": [5, 10**9]}, 400, "out of range"),
    ("missing model", {"prompt": "x"}, 400, "'model' is required"),
    ("unknown model", {"model": "gpt-5", "prompt": "x"}, 404, "does not exist"),
    ("negative max_tokens", {"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "'max_tokens' must be"),
    ("max_tokens too large", {"model": NAME, "prompt": "x", "max_tokens": MAX_LEN}, 400, "exceeds max_model_len"),
    ("max_tokens type", {"model": NAME, "prompt": "x", "max_tokens": "ten"}, 400, "'max_tokens' must be"),
    ("prompt too long", {"model": NAME, "prompt": [5] * (MAX_LEN + 1)}, 400, "more than max_model_len"),
    ("n > 1", {"model": NAME, "prompt": "x", "n": 2}, 400, "only n=1"),
    ("temperature", {"model": NAME, "prompt": "x", "temperature": 7}, 400, "'temperature' must be"),
    ("top_p", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "'top_p' must be"),
    ("logprobs", {"model": NAME, "prompt": "x", "logprobs": 9}, 400, "'logprobs' must be"),
    ("stop", {"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop' must be"),
    ("stream type", {"model": NAME, "prompt": "x", "stream": "yes"}, 400, "'stream' must be"),
    ("max_tokens 0 without echo", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "needs echo"),
    ("not an object", ["x"], 400, "must be a JSON object"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url = server + "/v1/completions"
    for name, body, status, message in BAD:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status, (name, r.status_code, r.text)
        error = r.json()["error"]
        assert message in error["message"], (name, error)
        assert set(error) == {"message", "type", "param", "code"}
    raw = [("invalid JSON", b'{"model": "tiny", "prompt": '), ("not UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe"}'),
           ("empty body", b"")]
    for name, data in raw:
        r = httpx.post(url, content=data, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "error" in r.json(), (name, r.text)
    r = httpx.post(server + "/v1/chat/completions", json={"model": NAME, "messages": []}, timeout=30)
    assert r.status_code == 404 and "base model" in r.json()["error"]["message"]
    r = httpx.get(server + "/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(url, timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.completions.create(model=NAME, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    # Still healthy, still serving.
    assert httpx.get(server + "/health", timeout=10).json() == {"status": "ok"}
    assert client.completions.create(model=NAME, prompt="Hei", max_tokens=3, temperature=0).choices[0].text
    assert _metrics(server)["active_slots"] == 0


def test_a_disconnected_stream_frees_its_slot(server):
    before = _metrics(server)
    body = {"model": NAME, "prompt": "Hei", "max_tokens": MAX_LEN - 10, "temperature": 0, "stream": True,
            "stop": ["\u0000never"]}  # a stop string: the text is decoded after every token (slower rows)
    with httpx.Client(timeout=60) as h, h.stream("POST", server + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # a few chunks, then hang up
        assert got[0].startswith("data: ")
    deadline = time.time() + 30
    while time.time() < deadline:
        m = _metrics(server)
        if m["active_slots"] == 0 and m["aborted_requests_total"] > before["aborted_requests_total"]:
            break
        time.sleep(0.2)
    m = _metrics(server)
    assert m["aborted_requests_total"] == before["aborted_requests_total"] + 1, m
    assert m["active_slots"] == 0
    # The row stopped early: far fewer tokens than it asked for were generated.
    assert m["generated_tokens_total"] - before["generated_tokens_total"] < MAX_LEN - 10


def test_overload_answers_429_then_serves(server, client):
    n = MAX_QUEUE + SLOTS + 40

    async def main():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n)) as h:
            body = {"model": NAME, "prompt": "Nordavind", "max_tokens": 60, "temperature": 0}
            return await asyncio.gather(*[h.post(server + "/v1/completions", json=body) for _ in range(n)])

    codes = [r.status_code for r in asyncio.run(main())]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= MAX_QUEUE // 2, codes
    assert httpx.get(server + "/health", timeout=10).status_code == 200
    assert client.completions.create(model=NAME, prompt="Hei", max_tokens=2, temperature=0).choices[0].text != "x"


def test_models_health_and_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(server + "/health", timeout=10).json() == {"status": "ok"}
    m = _metrics(server)
    for key in ("queue_depth", "active_slots", "tokens_per_second", "ttft_seconds_p50", "ttft_seconds_p99"):
        assert key in m
    assert m["slots"] == SLOTS and m["generated_tokens_total"] > 0 and m["ttft_seconds_p50"] > 0
    json.dumps(m)
