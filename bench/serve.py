"""Serving throughput on the model `normistral demo` trains: four ways to run one translation workload.

Workload: 256 prompts in the model card's template ("Engelsk: {0}\\nBokmål:"), half English sentences the
demo memorized as translation pairs (their outputs stop at a newline after a few tokens) and half English
text it never saw as a pair (outputs run long, often to the limit), shuffled; 64 max new tokens, greedy,
stop at the card's newline token set (every token whose text contains "\\n") or EOS. Output tokens are
counted up to and including the stop token. float32, same weights everywhere, one run, side by side:
 (a) transformers' generate in batches of 8 (left-padded, as the card runs it);
 (b) the static `inference.generate` in batches of --slots (a batch runs until its longest row stops);
 (c) the engine offline (`inference.engine.Engine`, --slots slots, continuous batching);
 (d) `normistral serve` (a subprocess, --slots slots) with 32 concurrent streaming clients (the official
     `openai` client), reporting p50/p99 time to first token and time per output token as clients see them.
Every JAX path runs the model as `normistral serve` / `Generator` load it on CPU: its layer stack split
into one module per layer (`jaxmodel.model.unstack_layers`; XLA CPU would copy each layer's weights out
of the stack in every call). Compilation is excluded from (b) to (d) (a warm-up pass / the server's
warm-up). (a), (b) and (c) run --repeat times, interleaved, and the best pass of each counts (each
pass's ratios are printed too).

Also a shared-prefix workload (`--prefix-prompts`): one fixed 5-shot translation prompt of several hundred
tokens followed by one sentence each, through the engine offline; it reports the engine's prefilled tokens
against the prompts' total (prefix caching computes the shared part once).

`--code DIR` runs everything with DIR (another checkout, e.g. the previous commit in a `git worktree`) first
on the import path and as the server's working directory: the same workloads through that commit's engine,
for side-by-side comparisons (only the API both share is used: `Engine(model, slots=, max_model_len=)`,
`warmup`, `run`, `Request`, `metrics()["prefill_tokens_total"]`).
Run: `normistral demo --workdir /tmp/demo && python bench/serve.py --model /tmp/demo/run/hf`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--code" in sys.argv:  # another checkout's packages first (see the docstring): set before importing them
    CODE = os.path.abspath(sys.argv[sys.argv.index("--code") + 1])
sys.path.insert(0, CODE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import machine, matmul_rate, median_seconds  # noqa: E402

from inference import generate  # noqa: E402
from inference.engine import Engine, Request  # noqa: E402
from jaxmodel import from_pretrained  # noqa: E402
from jaxmodel.model import unstack_layers  # noqa: E402
from normistral_demo import CORPUS, TEMPLATE  # noqa: E402


def workload(n: int, seed: int = 0) -> list[str]:
    with open(os.path.join(CORPUS, "translation_pairs.jsonl"), encoding="utf-8") as f:
        seen = [json.loads(x)["text"].split("\n")[0].removeprefix("Engelsk: ") for x in f if x.strip()]
    unseen = []
    for name in ("en.jsonl",):
        with open(os.path.join(CORPUS, name), encoding="utf-8") as f:
            for line in f:
                unseen += [s.strip() + "." for s in json.loads(line)["text"].split(". ") if len(s.split()) > 4]
    rng = np.random.default_rng(seed)
    half = n // 2
    picked = [seen[i % len(seen)] for i in rng.permutation(max(half, len(seen)))[:half]]
    picked += [unseen[i % len(unseen)] for i in range(n - half)]
    return [picked[i] for i in rng.permutation(n)]


def useful(rows, stops) -> list[list[int]]:
    out = []
    for row in rows:
        row = list(row)
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:end])
    return out


def five_shot_prefix() -> str:
    """A fixed 5-shot translation prompt of several hundred tokens: five shots of four card pairs each."""
    with open(os.path.join(CORPUS, "translation_pairs.jsonl"), encoding="utf-8") as f:
        pairs = [json.loads(x)["text"].strip().split("\n") for x in f if x.strip()]
    shots = []
    for i in range(5):
        group = pairs[4 * i:4 * i + 4]
        english = " ".join(p[0].removeprefix("Engelsk: ") for p in group)
        bokmal = " ".join(p[1].removeprefix("Bokmål: ") for p in group)
        shots.append(f"Engelsk: {english}\nBokmål: {bokmal}\n\n")
    return "".join(shots)


def shared_prefix(model, tok, n: int, new: int, stops, slots: int) -> dict:
    """The shared-prefix workload through the engine (warmed on other prompts first) -> tokens/s, the
    prefilled tokens against the prompts' total, and a digest of the outputs (to compare runs)."""
    prefix = five_shot_prefix()
    texts = [prefix + TEMPLATE.format(p) for p in workload(n, seed=1)]
    encoded = [list(x) for x in tok(texts)["input_ids"]]
    engine = Engine(model, slots=slots, max_model_len=max(map(len, encoded)) + new)
    engine.warmup()
    engine.run([Request(e[-40:], max_tokens=4, stop_ids=frozenset(stops)) for e in encoded[:slots]])
    reqs = [Request(e, max_tokens=new, stop_ids=frozenset(stops)) for e in encoded]
    before = engine.metrics()["prefill_tokens_total"]
    t = time.perf_counter()
    engine.run(reqs)
    seconds = time.perf_counter() - t
    prefilled = engine.metrics()["prefill_tokens_total"] - before
    out = sum(len(r.tokens) for r in reqs)
    prompt_tokens = sum(map(len, encoded))
    digest = hashlib.sha256(json.dumps([r.tokens for r in reqs]).encode()).hexdigest()[:16]
    return {"requests": n, "prefix_tokens": len(tok(prefix)["input_ids"]), "prompt_tokens": prompt_tokens,
            "prefilled_tokens": prefilled, "prefilled_fraction": round(prefilled / prompt_tokens, 3),
            "output_tokens": out, "seconds": round(seconds, 3), "tokens_per_s": round(out / seconds, 1),
            "outputs_sha256": digest}


def left_pad(token_lists, pad):
    width = max(len(t) for t in token_lists)
    ids = np.full((len(token_lists), width), pad, np.int64)
    mask = np.zeros_like(ids)
    for b, t in enumerate(token_lists):
        ids[b, width - len(t):], mask[b, width - len(t):] = t, 1
    return ids, mask


def transformers_runner(path, encoded, new, stops, pad):
    """A callable: one timed pass of transformers' generate in batches of 8 -> (outputs, seconds, work);
    its thread count (1 or all cores, whichever ran a first batch faster) is chosen first."""
    model = transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    work = {}

    def run(lists):
        outs, work["prompt_tokens"], work["row_steps"] = [], 0, 0
        for i in range(0, len(lists), 8):
            ids, mask = (torch.as_tensor(x) for x in left_pad(lists[i:i + 8], pad))
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                     eos_token_id=sorted(stops), pad_token_id=pad)
            outs += out[:, ids.shape[1]:].tolist()
            work["prompt_tokens"] += ids.numel()
            work["row_steps"] += ids.shape[0] * (out.shape[1] - ids.shape[1])
        return useful(outs, stops)

    times = {}
    for threads in sorted({1, os.cpu_count()}):  # OpenMP threads spin on a shared machine: the faster counts
        torch.set_num_threads(threads)
        times[threads] = median_seconds(lambda: run(encoded[:16]), warmup=1, repeats=1)
    threads = min(times, key=times.get)

    def timed():
        torch.set_num_threads(threads)
        t = time.perf_counter()
        outs = run(encoded)
        return outs, time.perf_counter() - t, dict(work)
    timed.threads = threads
    return timed


def static_runner(model, encoded, new, stops, pad, batch):
    """A callable: one timed pass of the static path -> (outputs, seconds); compiled by a first pass."""
    work = {}

    def run():
        outs, work["prompt_tokens"], work["row_steps"] = [], 0, 0
        for i in range(0, len(encoded), batch):
            ids, mask = left_pad(encoded[i:i + batch], pad)
            out = useful(generate(model, ids, mask, max_new_tokens=new, eos_token_ids=sorted(stops),
                                  pad_token_id=pad).tolist(), stops)
            outs += out
            work["prompt_tokens"] += ids.size
            work["row_steps"] += len(out) * max(map(len, out))  # its loop runs until every row stopped
        return outs

    run()  # compiles every bucket

    def timed():
        t = time.perf_counter()
        outs = run()
        return outs, time.perf_counter() - t, dict(work)
    return timed


def engine_runner(model, encoded, new, stops, slots, max_len, options=None):
    """A callable: one timed pass of the engine (its default prefill settings, as `normistral serve`
    runs it) -> (outputs, seconds, decode steps, prefill calls, padded prefill tokens); compiled and warmed
    first."""
    engine = Engine(model, slots=slots, max_model_len=max_len, **(options or {}))
    engine.warmup()
    engine.run([Request(e, max_tokens=new, stop_ids=frozenset(stops)) for e in encoded[:slots * 2]])

    def timed():
        reqs = [Request(e, max_tokens=new, stop_ids=frozenset(stops)) for e in encoded]
        keys = ("decode_steps_total", "prefill_calls_total", "prefill_tokens_total")
        before = engine.metrics()
        t = time.perf_counter()
        engine.run(reqs)
        seconds, after = time.perf_counter() - t, engine.metrics()
        return ([r.tokens for r in reqs], seconds, *(after[k] - before[k] for k in keys))
    return timed


def run_server(path, texts, new, slots, max_len, clients):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "normistral", "serve", path, "--port", str(port), "--slots", str(slots),
           "--max-model-len", str(max_len), "--dtype", "float32", "--served-model-name", "demo"]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=CODE)
    import httpx
    import openai

    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(log.read()[-2000:])
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)

        async def main():
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
            queue = list(enumerate(texts[:16]))
            results = {}

            async def one(i, text):
                t0 = time.perf_counter()
                first, n = None, 0
                stream = await client.completions.create(model="demo", prompt=text, max_tokens=new, temperature=0,
                                                         stop=["\n"], stream=True,
                                                         stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].text and first is None:
                        first = time.perf_counter()
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
                end = time.perf_counter()
                first = first or end
                results[i] = (first - t0, (end - first) / (n - 1) if n > 1 else None, n)

            async def worker():
                while queue:
                    await one(*queue.pop(0))

            await asyncio.gather(*[worker() for _ in range(4)])  # warm the server (untimed)
            results.clear()
            queue = list(enumerate(texts))
            t = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(clients)])
            return results, time.perf_counter() - t

        results, seconds = asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ttft = np.array([r[0] for r in results.values()])
    tpot = np.array([r[1] for r in results.values() if r[1] is not None])
    tokens = sum(r[2] for r in results.values())
    return tokens, seconds, ttft, tpot


def compute_floor(config, prompt_tokens: int, prompts: int, output_tokens: int, slots: int) -> dict:
    """The seconds the workload's matmuls need at least on this machine (every other op free): each
    prompt token through the layers (2 x layer parameters FLOPs; the lm_head only for each prompt's last
    token) at the rate of the model's own MLP matmul with 256 rows (prefill-sized), each output token
    through the layers and the lm_head at the rate with `slots` rows (a decode step)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layers = config.num_params() - 2 * v * d
    prefill_rate, decode_rate = matmul_rate(256, d, f, calls=50), matmul_rate(slots, d, f, calls=50)
    prefill_s = (2 * layers * prompt_tokens + 2 * v * d * prompts) / prefill_rate
    decode_s = 2 * (layers + v * d) * output_tokens / decode_rate
    return {"prefill_gflop_s": round(prefill_rate / 1e9, 1), "decode_gflop_s": round(decode_rate / 1e9, 1),
            "prefill_s": round(prefill_s, 3), "decode_s": round(decode_s, 3), "seconds": round(prefill_s + decode_s, 3)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="the demo's exported model (WORKDIR/run/hf)")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved passes of (a), (b) and (c); the best of each counts")
    parser.add_argument("--prefix-prompts", type=int, default=64, help="requests of the shared-prefix workload")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="the card workload's engine without prefix caching (its passes repeat the same prompts, "
                             "so later passes would reuse the first's pages)")
    parser.add_argument("--code", help="a checkout whose engine runs instead of this one's (see the docstring)")
    args = parser.parse_args()

    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    texts = [TEMPLATE.format(p) for p in workload(args.prompts)]
    encoded = [list(x) for x in tok(texts)["input_ids"]]
    newline = {i for i in range(tok.vocab_size) if "\n" in tok.decode([i])}
    stops = newline | {tok.eos_token_id}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    max_len = max(len(e) for e in encoded) + args.new
    model = unstack_layers(from_pretrained(args.model, progress=False))  # as Generator loads on CPU

    hf = transformers_runner(args.model, encoded, args.new, stops, pad)
    static, engine = (static_runner(model, encoded, args.new, stops, pad, args.slots),
                      engine_runner(model, encoded, args.new, stops, args.slots, max_len,
                                    {"prefix_caching": False} if args.no_prefix_caching else None))
    hf_s = static_s = engine_s = float("inf")
    ratios, hf_ratios = [], []
    for _ in range(args.repeat):  # interleaved: a slow spell of a shared machine hits all three alike
        hf_out, h_s, hf_work = hf()
        static_out, s_s, static_work = static()
        engine_out, e_s, engine_steps, prefill_calls, engine_prompt_tokens = engine()
        ratios.append(round(s_s / e_s, 2))
        hf_ratios.append(round(h_s / e_s, 2))
        hf_s, static_s, engine_s = min(hf_s, h_s), min(static_s, s_s), min(engine_s, e_s)
    server_tokens, server_s, ttft, tpot = run_server(os.path.abspath(args.model), texts, args.new, args.slots,
                                                     max_len, args.clients)

    n_tokens = sum(len(o) for o in engine_out)
    lengths = np.array([len(o) for o in engine_out])
    prompt_tokens = sum(map(len, encoded))
    floor = compute_floor(model.config, prompt_tokens, len(encoded), n_tokens, args.slots)
    result = {
        "bench": "serve", "machine": machine(), "prompts": len(texts), "new_tokens": args.new, "slots": args.slots,
        "output_tokens": n_tokens,
        "output_lengths_p10_p50_p90": [int(np.percentile(lengths, q)) for q in (10, 50, 90)],
        "stopped_early_fraction": round(float((lengths < args.new).mean()), 3),
        "engine_equals_static": engine_out == static_out, "engine_equals_transformers": engine_out == hf_out,
        "transformers_tokens_per_s": round(sum(map(len, hf_out)) / hf_s, 1), "transformers_threads": hf.threads,
        "static_tokens_per_s": round(sum(map(len, static_out)) / static_s, 1),
        "engine_tokens_per_s": round(n_tokens / engine_s, 1), "engine_decode_steps": engine_steps,
        "engine_prefill_calls": prefill_calls, "repeat": args.repeat, "engine_vs_static_per_pass": ratios,
        "engine_vs_transformers_per_pass": hf_ratios,
        "server_tokens_per_s": round(server_tokens / server_s, 1), "server_clients": args.clients,
        "server_ttft_ms_p50": round(float(np.percentile(ttft, 50)) * 1e3, 1),
        "server_ttft_ms_p99": round(float(np.percentile(ttft, 99)) * 1e3, 1),
        "server_tpot_ms_p50": round(float(np.percentile(tpot, 50)) * 1e3, 2),
        "server_tpot_ms_p99": round(float(np.percentile(tpot, 99)) * 1e3, 2),
        "prompt_tokens": prompt_tokens,
        "work_computed": {"transformers": hf_work, "static": static_work,
                          "engine": {"prompt_tokens": engine_prompt_tokens, "row_steps": engine_steps * args.slots}},
        "compute_floor": floor, "engine_vs_compute_floor": round(engine_s / floor["seconds"], 2),
        "transformers_over_4_vs_compute_floor": round(hf_s / 4 / floor["seconds"], 2),
        "code": CODE, "card_prefix_caching": not args.no_prefix_caching,
        "shared_prefix": shared_prefix(model, tok, args.prefix_prompts, args.new, stops, args.slots),
    }
    result["engine_vs_static"] = round(result["engine_tokens_per_s"] / result["static_tokens_per_s"], 2)
    result["engine_vs_transformers"] = round(result["engine_tokens_per_s"] / result["transformers_tokens_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
