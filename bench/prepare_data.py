"""Throughput of `prepare-data` (tokenize + pack + write) against the tokenizer's own batch-encode speed.

The corpus: the bundled training/corpus documents repeated to >= 50 MB of .jsonl, cut into 4 files (a
realistic source is many files), cut further into 2 MiB units here: at 50B tokens there are thousands of
32 MiB units per run, so units far outnumber workers; a 50 MB corpus needs small units for the same balance. The
tokenizer: a
NorMistral-pipeline byte-level BPE trained on the bundled corpus (8192 tokens; the real one has 51,200).
- ceiling: `tokenizers.Tokenizer.encode_batch_fast` on the same documents, already in memory, batches of
  256, on one core (TOKENIZERS_PARALLELISM=false), i.e. what one worker could at best do; and the same in
  2 concurrent processes, each on half of the documents: this machine's own 2-core scaling of the tokenizer;
- prepare-data with 1 worker (in-process) and with 2 worker processes, through the real API, from the
  files on disk to the committed index.json (planning, reading, JSON parsing, packing, writing).
Targets: one worker >= 0.8 of the ceiling; 2 workers >= 1.7x one worker.
Each figure is the best of `--repeat` runs (default 2). Run: `python bench/prepare_data.py [--mb 50]`. Prints one
JSON object with the figures and projections.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training.documents import iter_documents  # noqa: E402

CORPUS = os.path.join(ROOT, "training", "corpus")
NAMES = ("nb.jsonl", "nn.jsonl", "se.jsonl", "en.jsonl", "translation_pairs.jsonl", "heldout.jsonl")


def make_corpus(root: str, megabytes: float, files: int = 4) -> tuple[list[str], list[str]]:
    docs = []
    for name in NAMES:
        docs += list(iter_documents(os.path.join(CORPUS, name)))
    lines = [json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs]
    one = sum(len(x.encode()) for x in lines)
    copies = int(megabytes * 1e6 / one) + 1
    paths, all_docs = [], []
    per_file = -(-copies // files)
    for f in range(files):
        path = os.path.join(root, f"part-{f}.jsonl")
        n = min(per_file, copies - f * per_file)
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(lines * n)
        paths.append(path)
        all_docs += docs * n
    return paths, all_docs


def ceiling(tokenizer_dir: str, docs: list[str]) -> tuple[float, int]:
    """(tokens/s, tokens) of the bare tokenizer, one core, the prepared stream's token count (+ </s>)."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    tok.encode_special_tokens = True
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), 256):
        tokens += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(docs[i:i + 256], add_special_tokens=True))
    return tokens / (time.perf_counter() - t0), tokens


def _ceiling_part(args) -> tuple[int, float, float]:
    """(tokens, start, end) of `ceiling` on a part of the documents, in a worker process."""
    tokenizer_dir, docs, start_at = args
    while time.time() < start_at:  # both processes start encoding together, after their imports
        time.sleep(0.01)
    t0 = time.time()
    _, tokens = ceiling(tokenizer_dir, docs)
    return tokens, t0, time.time()


def ceiling_two_processes(tokenizer_dir: str, docs: list[str]) -> float:
    """tokens/s of `ceiling` in 2 concurrent processes, each on half of the documents."""
    import multiprocessing

    half = len(docs) // 2
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        start_at = time.time() + 5.0
        halves = [(tokenizer_dir, docs[:half], start_at), (tokenizer_dir, docs[half:], start_at)]
        parts = pool.map(_ceiling_part, halves)
    return sum(p[0] for p in parts) / (max(p[2] for p in parts) - min(p[1] for p in parts))


def run_prepare(tokenizer_dir: str, inputs: list[str], out: str, workers: int, unit_bytes: int) -> tuple[float, int]:
    from training.prepare import prepare_data

    t0 = time.perf_counter()
    index = prepare_data(tokenizer_dir, inputs, out, 2048, workers=workers, unit_bytes=unit_bytes, progress=False)
    seconds = time.perf_counter() - t0
    tokens = sum(s["tokens"] for s in index["sources"])
    shutil.rmtree(out)
    return tokens / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--unit-mb", type=float, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from training.tokenizer import train_tokenizer

    root = tempfile.mkdtemp(prefix="bench-prepare-")
    try:
        tok_dir = os.path.join(root, "tok")
        train_tokenizer([os.path.join(CORPUS, n) for n in NAMES[:5]], tok_dir, vocab_size=8192)
        inputs, docs = make_corpus(root, args.mb)
        size = sum(os.path.getsize(p) for p in inputs)
        unit = int(args.unit_mb * 2**20)
        glob = [os.path.join(root, "part-*.jsonl")]
        ceil = ceil2 = one = two = 0.0
        for _ in range(args.repeat):  # interleaved, so a slow spell of a shared machine hits every figure alike
            rate, ceil_tokens = ceiling(tok_dir, docs)
            ceil = max(ceil, rate)
            ceil2 = max(ceil2, ceiling_two_processes(tok_dir, docs))
            rate, tokens = run_prepare(tok_dir, glob, os.path.join(root, "o1"), 1, unit)
            one = max(one, rate)
            rate, tokens2 = run_prepare(tok_dir, glob, os.path.join(root, "o2"), 2, unit)
            two = max(two, rate)
            assert tokens == tokens2 == ceil_tokens, (tokens, tokens2, ceil_tokens)
        del docs
        per_worker = two / 2
        result = {
            "machine": machine(), "corpus_mb": round(size / 1e6, 1), "tokens": tokens, "unit_mb": args.unit_mb,
            "repeat": args.repeat,
            "ceiling_tokens_per_s_one_core": round(ceil), "ceiling_tokens_per_s_two_processes": round(ceil2),
            "ceiling_speedup_2_over_1": round(ceil2 / ceil, 3),
            "prepare_1_worker_tokens_per_s": round(one), "prepare_2_workers_tokens_per_s": round(two),
            "ratio_1_worker_to_ceiling": round(one / ceil, 3), "speedup_2_over_1": round(two / one, 3),
            "ratio_per_worker_to_ceiling_at_2": round(per_worker / ceil, 3),
            # Projections: 50B tokens at a measured per-worker rate, scaled linearly with the worker count:
            # the 2-worker run's (pessimistic where the machine is shared) and the 1-worker run's.
            "hours_50B_96_core_vm": round(50e9 / (96 * per_worker) / 3600, 2),
            "hours_50B_100_engine_workers": round(50e9 / (100 * per_worker) / 3600, 2),
            "hours_50B_96_core_vm_at_1_worker_rate": round(50e9 / (96 * one) / 3600, 2),
            "hours_50B_100_engine_workers_at_1_worker_rate": round(50e9 / (100 * one) / 3600, 2),
        }
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
