"""`normistral serve` and its engine (one real server subprocess for this module): after warm-up, no
request kind compiles anything (greedy, sampled, echo + logprobs, top-logprob streams, prompts packed and
chunked), counted by the engine and shown on /metrics as compiles_total."""

import json
import re

import httpx
import numpy as np
import pytest

from tests.inference.serving import start_serve, stop_serve


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """The server with a 16-token prefill chunk (the smallest: few programs, a fast warm-up) -> (base url,
    its log file's path)."""
    path = str(tmp_path_factory.mktemp("serve_engine") / "server.log")
    proc, base, log = start_serve(tiny_dir, path, "--slots", "2", "--max-model-len", "128", "--dtype", "float32",
                                  "--prefill-chunk", "16")
    try:
        yield base, path
    finally:
        stop_serve(proc, log)


def _metrics(base) -> dict:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^normistral_(\w+) (\S+)$", text, re.M)}


def _complete(base, **body) -> list[dict]:
    """The completion's choices (a stream's chunks, in order)."""
    body = {"model": "tiny", **body}
    if not body.get("stream"):
        r = httpx.post(base + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"]
    chunks = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += json.loads(line[6:])["choices"]
    return chunks


def test_no_request_kind_compiles_after_warmup(server):
    base, log = server
    with open(log) as f:
        warmed = int(re.findall(r"normistral serve: (\d+) programs ready", f.read())[-1])
    start = _metrics(base)
    # one XLA compilation per program: the step at each token width (16, and the budget 16 + 2 slots rounded
    # up to 24), with and without prompt logprobs
    assert warmed == 2 * 2 and start["compiles_total"] == warmed
    rng = np.random.default_rng(4)
    short, long = (rng.integers(4, 300, size=n).tolist() for n in (5, 40))  # 40: prefilled over 3 steps
    for prompt in (short, long):
        greedy = _complete(base, prompt=prompt, max_tokens=6, temperature=0)
        assert greedy[0]["finish_reason"] in ("stop", "length")
        sampled = _complete(base, prompt=prompt, max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=3)
        assert sampled[0]["finish_reason"] in ("stop", "length")
        echo = _complete(base, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
        assert len(echo[0]["logprobs"]["token_logprobs"]) == len(prompt)
        sampled_echo = _complete(base, prompt=prompt, max_tokens=3, echo=True, logprobs=1, temperature=0.8, seed=1)
        assert sampled_echo[0]["finish_reason"] in ("stop", "length")
        stream = _complete(base, prompt=prompt, max_tokens=6, logprobs=5, temperature=0, stream=True)
        assert stream[-1]["finish_reason"] in ("stop", "length")
        tops = [top for c in stream if c["logprobs"] for top in c["logprobs"]["top_logprobs"]]
        assert tops and all(1 <= len(top) <= 5 for top in tops)  # 5 ids; fewer keys where two decode alike
    end = _metrics(base)
    assert end["compiles_total"] == start["compiles_total"], "a request compiled a program after warm-up"
    assert end["finished_requests_total"] - start["finished_requests_total"] == 10
    assert end["failed_requests_total"] == 0
