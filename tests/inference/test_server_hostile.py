"""`normistral serve` against hostile and careless clients: one real server subprocess for the module (on
--port 0: the announced URL is the real one), raw sockets for what a polite client never does, real
signals. Out-of-range numbers, NaN/Infinity literals and lone surrogates are 400s that leave the engine
running; chunked bodies over the limit get 413 while they arrive; silent sockets and unsent bodies are
timed out (closed / 408) while others are served; the connection cap answers 503; 429 carries Retry-After
and an unqueueable request is 400; a non-streaming client that hangs up is cancelled at once; a 5 MB
echo+logprobs answer does not block /health; 64 mixed clients for 20 s leave correct answers and flat
memory; SIGTERM drains (queued 503, streams end with [DONE], exit 0). Two short-lived servers more: one
whose engine dies (clients get a 500 / an error event, the process exits 1), and startup checks that
fail before the model loads."""

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.inference.serving import ENV, ROOT, start_serve

NAME = "tiny"
SLOTS = 4
MAX_LEN = 512
MAX_QUEUE = 48
MAX_CONNECTIONS = 100
TIMEOUT = 2.0  # --request-timeout
GRACE = 3.0  # --shutdown-grace


def _start(tiny_dir, log_path, *extra, env=ENV):
    """A `normistral serve` on --port 0 -> (process, base URL read from its announcement, log file)."""
    return start_serve(tiny_dir, log_path, "--slots", str(SLOTS), "--max-model-len", str(MAX_LEN), "--dtype",
                       "float32", "--served-model-name", NAME, "--max-queue", str(MAX_QUEUE), "--prefill-chunk",
                       "64", "--no-warmup", *extra, env=env)


def _stop(proc, log):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def served(tiny_dir):
    proc, base, log = _start(tiny_dir, os.path.join(os.path.dirname(tiny_dir), "hostile.log"),
                             "--request-timeout", str(TIMEOUT), "--max-connections", str(MAX_CONNECTIONS),
                             "--shutdown-grace", str(GRACE))
    yield proc, base, log
    _stop(proc, log)


@pytest.fixture(scope="module")
def server(served):
    return served[1]


def _metrics(server) -> dict:
    text = httpx.get(server + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^normistral_(\w+) (\S+)$", text, re.M)}


def _post(server, body, timeout=60):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server + "/v1/completions", content=data, headers={"content-type": "application/json"},
                      timeout=timeout)


def _healthy_and_serving(server):
    assert httpx.get(server + "/health", timeout=10).json() == {"status": "ok"}
    r = _post(server, {"model": NAME, "prompt": "Hei", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text


def _raw(server) -> socket.socket:
    host, port = server.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read_response(sock) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP/1.1 answer on a raw socket (read until close or length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            break
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", -1))
    while length < 0 or len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return int(lines[0].split()[1]), headers, body


def test_the_announced_url_is_the_real_port(served):
    proc, base, _ = served
    port = int(base.rsplit(":", 1)[1])
    assert port != 0
    listening = [c.laddr.port for c in psutil.Process(proc.pid).net_connections() if c.status == psutil.CONN_LISTEN]
    assert listening == [port]


BAD_NUMBERS = [
    ("top_k 2^31", {"top_k": 2**31, "temperature": 1}, "'top_k' must be"),
    ("top_k over the vocabulary", {"top_k": 100_000}, "'top_k' must be"),
    ("seed 2^64", {"seed": 2**64}, "'seed' must be"),
    ("max_tokens 2^40", {"max_tokens": 2**40}, "'max_tokens' must be"),
    ("logprobs 6", {"logprobs": 6}, "'logprobs' must be"),
    ("top_p 0", {"top_p": 0.0}, "'top_p' must be"),
]
RAW_NUMBERS = [(b'"temperature": NaN', "not valid JSON"), (b'"top_p": -Infinity', "not valid JSON"),
               (b'"temperature": Infinity', "not valid JSON"), (b'"seed": ' + b"9" * 5000, "not valid JSON"),
               (b'"temperature": 1e999', "'temperature' must be")]


def test_out_of_range_numbers_are_400_and_the_engine_lives(server):
    for name, fields, message in BAD_NUMBERS:
        r = _post(server, {"model": NAME, "prompt": "Hei", "max_tokens": 4, **fields})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (name, r.text)
    for literal, message in RAW_NUMBERS:
        r = _post(server, b'{"model": "tiny", "prompt": "Hei", ' + literal + b"}")
        assert r.status_code == 400 and message in r.json()["error"]["message"], (literal[:30], r.text)
    _healthy_and_serving(server)


def test_lone_surrogates_are_400(server):
    for body in (b'{"model": "tiny", "prompt": "a\\ud800b"}', b'{"model": "\\udfff", "prompt": "x"}',
                 b'{"model": "tiny", "prompt": ["ok", "\\udc00"]}', b'{"model": "tiny", "prompt": "x", '
                 b'"stop": ["\\ud83d"]}', b'{"model": "tiny", "prompt": "x", "\\ud800": 1}'):
        r = _post(server, body)
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], (body, r.text)
    r = _post(server, b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "max_tokens": 2}')  # a proper pair: fine
    assert r.status_code == 200, r.text
    _healthy_and_serving(server)


def test_a_chunked_body_over_the_limit_gets_413_while_it_arrives(server):
    limit = 4 << 20
    with _raw(server) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"transfer-encoding: chunked\r\n\r\n")
        block = b"a" * (1 << 20)
        sent = 0
        while sent <= limit:  # one byte past the limit, and never the final chunk: the server must not wait
            part = block[: limit + 1 - sent] if sent + len(block) > limit else block
            s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
            sent += len(part)
        t = time.time()
        status, _, body = _read_response(s)
    assert status == 413 and "over" in json.loads(body)["error"]["message"]
    assert time.time() - t < TIMEOUT  # at once, not at the body timeout
    _healthy_and_serving(server)


def test_silent_sockets_and_unsent_bodies_time_out_while_others_are_served(server):
    _healthy_and_serving(server)  # compiled: serving "meanwhile" below takes well under the timeout
    t = time.time()
    silent = _raw(server)
    partial = _raw(server)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")  # headers never finished
    promised = _raw(server)
    promised.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"model\": ")
    _healthy_and_serving(server)  # meanwhile
    for s in (silent, partial, promised):
        s.settimeout(TIMEOUT + 5)
    status, _, body = _read_response(promised)
    assert status == 408 and "--request-timeout" in json.loads(body)["error"]["message"]
    for s in (silent, partial):
        status, _, _ = _read_response(s)
        assert status == 408
        assert s.recv(10) == b""  # closed
    assert time.time() - t < TIMEOUT + 2
    for s in (silent, partial, promised):
        s.close()
    _healthy_and_serving(server)


def test_connections_past_the_cap_get_503(server):
    held = [_raw(server) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # every one accepted
        with _raw(server) as extra:
            status, headers, body = _read_response(extra)
        assert status == 503 and headers.get("retry-after") and "--max-connections" in body.decode()
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    _healthy_and_serving(server)


def test_429_carries_retry_after_and_an_unqueueable_request_is_400(server):
    r = _post(server, {"model": NAME, "prompt": ["x"] * (MAX_QUEUE + 1), "max_tokens": 2})
    assert r.status_code == 400 and "--max-queue" in r.json()["error"]["message"], r.text
    fill = {"model": NAME, "prompt": ["Nordavind og sol"] * MAX_QUEUE, "max_tokens": 100, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", server + "/v1/completions", json=fill) as first:
        assert first.status_code == 200
        second = _post(server, {**fill, "stream": False})
        assert second.status_code == 429 and second.headers["retry-after"] == "1", second.text
        assert second.json()["error"]["type"] == "rate_limit_error"
    deadline = time.time() + 30  # the first request's client left: its prompts are cancelled
    while time.time() < deadline and (m := _metrics(server))["active_slots"] + m["queue_depth"] > 0:
        time.sleep(0.1)
    _healthy_and_serving(server)


def _generating(server, before, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = _metrics(server)
        if m["active_slots"] > 0 and m["generated_tokens_total"] > before["generated_tokens_total"] + 5:
            return m
        time.sleep(0.05)
    raise AssertionError("the request did not start generating")


def test_a_non_streaming_client_that_hangs_up_is_cancelled_at_once(server):
    before = _metrics(server)
    body = json.dumps({"model": NAME, "prompt": "Hei", "max_tokens": MAX_LEN - 10, "temperature": 0,
                       "stop": ["\u0000never"]}).encode()
    s = _raw(server)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\n\r\n" % len(body) + body)
    _generating(server, before)
    s.close()  # hang up while tokens flow
    t = time.time()
    while time.time() - t < 5:
        m = _metrics(server)
        if m["active_slots"] == 0 and m["aborted_requests_total"] > before["aborted_requests_total"]:
            break
        time.sleep(0.02)
    assert m["aborted_requests_total"] == before["aborted_requests_total"] + 1 and m["active_slots"] == 0, m
    assert time.time() - t < 2
    time.sleep(0.3)
    after = _metrics(server)
    assert after["generated_tokens_total"] == m["generated_tokens_total"]  # stopped growing
    assert after["generated_tokens_total"] - before["generated_tokens_total"] < MAX_LEN - 10


def test_a_large_echo_logprobs_answer_does_not_block_health(server):
    prompts = [[5 + (i * 7 + j) % 300 for j in range(MAX_LEN - 1)] for i in range(MAX_QUEUE)]
    body = {"model": NAME, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 5}
    # Once first, so that what is timed is the answer, not compiling (the trace holds the GIL; --no-warmup).
    assert _post(server, body, timeout=300).status_code == 200
    result, gaps = {}, []
    thread = threading.Thread(target=lambda: result.update(r=_post(server, body, timeout=300)))
    thread.start()
    with httpx.Client(timeout=30) as h:
        while thread.is_alive():
            t = time.perf_counter()
            assert h.get(server + "/health").status_code == 200
            gaps.append(time.perf_counter() - t)
            time.sleep(0.01)
    r = result["r"]
    assert r.status_code == 200 and len(r.content) > 3_000_000, (r.status_code, len(r.content))
    choices = r.json()["choices"]
    assert len(choices) == MAX_QUEUE and all(len(c["logprobs"]["tokens"]) == MAX_LEN - 1 for c in choices)
    assert max(gaps) < 0.5, sorted(gaps)[-5:]


async def _load(server, deadline, prompts, reference, stats, seed):
    """One client until the deadline: good plain and streamed requests (checked against the reference),
    hang-ups, bad requests; 429s are retried after their Retry-After."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=server, timeout=120) as h:
        while time.time() < deadline:
            kind = rng.choice(["plain", "plain", "stream", "hangup", "bad"])
            i = rng.randrange(len(prompts))
            body = {"model": NAME, "prompt": prompts[i], "max_tokens": 8, "temperature": 0}
            if kind == "bad":
                r = await h.post("/v1/completions", json={**body, "top_k": 2**40})
                assert r.status_code == 400, r.text
                stats["bad"].append(1)
            elif kind == "hangup":
                async with h.stream("POST", "/v1/completions", json={**body, "max_tokens": 200,
                                                                    "stream": rng.random() < 0.5}) as r:
                    await asyncio.sleep(rng.random() * 0.3)
                stats["hangup"].append(r.status_code)
            elif kind == "plain":
                r = await h.post("/v1/completions", json=body)
                if r.status_code == 429:
                    stats["429"].append(r.headers["retry-after"])
                    await asyncio.sleep(float(r.headers["retry-after"]))
                    continue
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[i], r.text
                stats["ok"].append(1)
            else:
                async with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    if r.status_code == 429:
                        stats["429"].append(r.headers["retry-after"])
                        await asyncio.sleep(float(r.headers["retry-after"]))
                        continue
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                assert lines[-1] == "data: [DONE]"
                assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]) == reference[i]
                stats["ok"].append(1)


def test_64_mixed_clients_for_20_s_answers_right_and_memory_stays_flat(served):
    proc, server, _ = served
    prompts = ["Engelsk: I like cheese.\nBokmål:", "Hei på deg, hvordan", "Nordavind og sol", "Where is",
               "Været er", "Hvor er togstasjonen", "Bare bra", "The weather"]
    reference = [_post(server, {"model": NAME, "prompt": p, "max_tokens": 8, "temperature": 0}).json()
                 ["choices"][0]["text"] for p in prompts]  # one at a time, before the crowd
    stats = {"ok": [], "bad": [], "hangup": [], "429": []}
    rss, seconds = [], 20.0
    process = psutil.Process(proc.pid)
    start = time.time()
    done = threading.Event()

    def sample():
        while not done.wait(0.5):
            rss.append((time.time() - start, process.memory_info().rss))

    sampler = threading.Thread(target=sample)
    sampler.start()

    async def main():
        await asyncio.gather(*[_load(server, start + seconds, prompts, reference, stats, k) for k in range(64)])

    try:
        asyncio.run(main())
    finally:
        done.set()
        sampler.join()
    assert len(stats["ok"]) > 64 and stats["bad"] and stats["hangup"], {k: len(v) for k, v in stats.items()}
    assert set(stats["429"]) <= {"1"}
    deadline = time.time() + 30
    while time.time() < deadline and (m := _metrics(server))["active_slots"] + m["queue_depth"] > 0:
        time.sleep(0.1)
    assert m["active_slots"] == 0 and m["queue_depth"] == 0
    _healthy_and_serving(server)
    second_half = [b for t, b in rss if t >= seconds / 2]
    growth = max(second_half) - second_half[0]
    assert growth < 30 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over the last half"


def test_sigterm_drains_streams_and_answers_the_queued_503_then_exits_0(served):
    proc, server, log = served
    before = _metrics(server)
    body = {"model": NAME, "prompt": "Hei", "max_tokens": MAX_LEN - 10, "temperature": 0, "stream": True,
            "stop": ["\u0000never"]}
    results = {}

    def stream(k):
        with httpx.Client(timeout=60) as h, h.stream("POST", server + "/v1/completions", json=body) as r:
            results[k] = [line for line in r.iter_lines() if line.startswith("data: ")]

    def queued():
        results["queued"] = _post(server, {**body, "stream": False})

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(SLOTS)]
    for t in threads:
        t.start()
    _generating(server, before)
    threads.append(threading.Thread(target=queued))
    threads[-1].start()
    deadline = time.time() + 30
    while _metrics(server)["queue_depth"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=GRACE + 20) == 0
    assert time.time() - t < GRACE + 10
    for thread in threads:
        thread.join(timeout=30)
    assert results["queued"].status_code == 503 and results["queued"].headers.get("retry-after")
    for k in range(SLOTS):
        lines = results[k]
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][6:])
        assert "error" in last or last["choices"][0]["finish_reason"] in ("stop", "length"), last
    log.seek(0)
    assert "Traceback" not in log.read()


def test_an_engine_that_dies_fails_its_clients_and_the_process_exits_1(tiny_dir):
    env = {**ENV, "NORMISTRAL_FAULTS": "engine_fails_at_step=3"}
    proc, server, log = _start(tiny_dir, os.path.join(os.path.dirname(tiny_dir), "dies.log"), env=env)
    try:
        results = {}

        def stream():
            with httpx.Client(timeout=120) as h, h.stream("POST", server + "/v1/completions", json={
                    "model": NAME, "prompt": "Hei", "max_tokens": 50, "stream": True}) as r:
                results["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        thread = threading.Thread(target=stream)
        thread.start()
        plain = _post(server, {"model": NAME, "prompt": "Hei", "max_tokens": 50}, timeout=120)
        thread.join(timeout=120)
        # 500 when the engine failed it; 503 if it came after the engine had died
        assert plain.status_code in (500, 503) and plain.json()["error"]["type"] == "server_error", plain.text
        assert "injected fault" in plain.json()["error"]["message"]
        assert results["stream"][-1] == "data: [DONE]" and "error" in json.loads(results["stream"][-2][6:])
        assert proc.wait(timeout=30) == 1
        log.seek(0)
        text = log.read()
        assert "Traceback" not in text
        assert text.strip().splitlines()[-1].startswith("normistral: error: the engine stopped (RuntimeError: "
                                                        "injected fault")
    finally:
        _stop(proc, log)


def test_ctrl_c_during_the_first_request_answers_it_and_exits_0(tiny_dir):
    proc, server, log = _start(tiny_dir, os.path.join(os.path.dirname(tiny_dir), "ctrl_c.log"),
                               "--shutdown-grace", "1")
    try:
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=_post(server, {
            "model": NAME, "prompt": "Hei", "max_tokens": 50, "temperature": 0, "stop": ["\u0000never"]})))
        thread.start()
        deadline = time.time() + 60
        while _metrics(server)["active_slots"] < 1 and time.time() < deadline:  # compiling its steps (--no-warmup)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        thread.join(timeout=30)
        r = result["r"]
        if r.status_code == 200:  # finished within the grace: a whole answer, never an empty "stop"
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 50, r.text
        else:
            assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"], r.text
        log.seek(0)
        assert "Traceback" not in log.read()
    finally:
        _stop(proc, log)


def test_serve_refuses_bad_flags_before_loading_the_model(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [(["--max-model-len", "1"], "--max-model-len 1: must be >= 2"),
                 (["--served-model-name", ""], "--served-model-name ''"),
                 (["--port", str(port)], f"--port {port}: cannot listen there (address already in use)"),
                 (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: not an address"),
                 (["--slots", "10000000"], "--max-num-seqs 10000000: more sequences than the pool's ")]
        for flags, message in cases:
            r = subprocess.run([sys.executable, "-m", "normistral", "serve", tiny_dir, "--dtype", "float32", *flags],
                               cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
            last = r.stderr.strip().splitlines()[-1]
            assert r.returncode == 2 and last.startswith("normistral: error: ") and message in last, (flags, r.stderr)
            assert "Traceback" not in r.stderr
