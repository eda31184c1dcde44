"""Evaluation throughput: the `normistral` lm-eval model vs lm-eval's own `hf` model (HFLM), same run.

A 1,000-request multiple-choice task (250 Norwegian documents from the bundled corpus x 4 choices, a
NorEval-style prompt "Tekst: ...\\nSpørsmål: ...\\nSvar:"), written as a local lm-eval YAML, run through
`lm_eval.simple_evaluate` on both models: the 64M config (4 layers, hidden 512, vocab 51200), float32,
the same random weights, a tokenizer trained on the bundled corpus. Requests/s counts the time spent
inside each model's `loglikelihood` (the harness's own work, identical for both, is left out; it is
printed too). HFLM: batch_size 16 and 64 (the faster is the reference), torch with all cores. Ours:
batch_size 8 rows of 512 packed tokens. Each model runs the task twice; the second (warm: our jit
compiles done, torch's allocator warm) is the figure, the first is printed with compilation included.
Both must give the same accuracy and log-likelihoods within 1e-4. Run: `python bench/eval.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_MULTIPROC", "1")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from common import bench_checkpoint, machine  # noqa: E402

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "corpus")


def make_task(root: str, docs: int = 250, seed: int = 0) -> str:
    """A multiple-choice task YAML (+ JSONL data) under root; returns the directory."""
    rng = np.random.default_rng(seed)
    texts = []
    for name in ("nb.jsonl", "nn.jsonl"):
        with open(os.path.join(CORPUS, name), encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    words = sorted({w.strip(".,!?:;") for t in texts for w in t.split() if len(w) > 3})
    os.makedirs(root, exist_ok=True)
    data = os.path.join(root, "mc.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for i in range(docs):
            sentences = texts[i % len(texts)].split(". ")
            start = int(rng.integers(0, max(1, len(sentences) - 3)))
            passage = ". ".join(sentences[start:start + int(rng.integers(1, 4))]).strip()
            choices = [str(w) for w in rng.choice(words, size=4, replace=False)]
            f.write(json.dumps({"tekst": passage, "valg": choices, "svar": int(rng.integers(0, 4))},
                               ensure_ascii=False) + "\n")
    with open(os.path.join(root, "bench_mc.yaml"), "w", encoding="utf-8") as f:
        f.write(f"""task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Tekst: {{{{tekst}}}}\\nSpørsmål: Hvilket ord hører hjemme i teksten?\\nSvar:"
doc_to_choice: "{{{{valg}}}}"
doc_to_target: svar
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    return root


class Timed:
    """Wraps an lm-eval model's loglikelihood to add up the seconds spent inside it."""

    def __init__(self, lm):
        self.lm, self.seconds, self.requests = lm, 0.0, 0
        inner = lm.loglikelihood

        def timed(requests, *args, **kwargs):
            t = time.perf_counter()
            out = inner(requests, *args, **kwargs)
            self.seconds += time.perf_counter() - t
            self.requests += len(requests)
            return out

        lm.loglikelihood = timed


def run(lm, task_dir: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    timer = Timed(lm)
    t = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=TaskManager(include_path=task_dir),
                                      log_samples=True, bootstrap_iters=0)
    total = time.perf_counter() - t
    logliks = [r[0] for s in results["samples"]["bench_mc"] for r in (x[0] for x in s["resps"])]
    del lm.loglikelihood  # back to the class's method
    return {"requests": timer.requests, "model_s": timer.seconds, "total_s": total,
            "requests_per_s": timer.requests / timer.seconds, "acc": results["results"]["bench_mc"]["acc,none"],
            "logliks": logliks}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "normistral-bench-64m-eval"))
    parser.add_argument("--batch-size", type=int, default=8, help="our packed rows per call")
    args = parser.parse_args()
    import torch
    from lm_eval.models.huggingface import HFLM

    from inference.lm_eval_adapter import NorMistralLM
    from training.tokenizer import train_tokenizer

    path = bench_checkpoint(args.checkpoint)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        tok_dir = tempfile.mkdtemp(prefix="bench-tok-")
        os.rmdir(tok_dir)
        files = [os.path.join(CORPUS, n) for n in ("nb.jsonl", "nn.jsonl", "se.jsonl", "en.jsonl")]
        train_tokenizer(files, tok_dir, vocab_size=4096)
        for name in os.listdir(tok_dir):
            os.replace(os.path.join(tok_dir, name), os.path.join(path, name))
    task_dir = make_task(tempfile.mkdtemp(prefix="bench-eval-"))

    ours_lm = NorMistralLM(pretrained=path, dtype="float32", batch_size=args.batch_size, progress=False)
    ours = [run(ours_lm, task_dir) for _ in range(2)]
    del ours_lm
    torch.set_num_threads(os.cpu_count())
    theirs = {}
    for bs in (16, 64):
        hf_lm = HFLM(pretrained=path, dtype="float32", batch_size=bs, device="cpu")
        theirs[bs] = [run(hf_lm, task_dir) for _ in range(2)]
        del hf_lm
    best = max(theirs, key=lambda bs: theirs[bs][1]["requests_per_s"])
    ref, mine = theirs[best][1], ours[1]
    diff = float(np.max(np.abs(np.asarray(ref["logliks"]) - np.asarray(mine["logliks"]))))
    summary = {
        "bench": "eval",
        "machine": machine(),
        "requests": mine["requests"],
        "normistral_requests_per_s": round(mine["requests_per_s"], 1),
        "normistral_first_run_requests_per_s": round(ours[0]["requests_per_s"], 1),
        **{f"hf_bs{bs}_requests_per_s": round(r[1]["requests_per_s"], 1) for bs, r in theirs.items()},
        "hf_best_batch_size": best,
        "ratio": round(mine["requests_per_s"] / ref["requests_per_s"], 2),
        "total_s_normistral": round(mine["total_s"], 1),
        "total_s_hf": round(ref["total_s"], 1),
        "acc_equal": mine["acc"] == ref["acc"],
        "max_abs_loglik_diff": diff,
    }
    print(json.dumps(summary))
    if not summary["acc_equal"] or diff > 1e-4:
        raise SystemExit("bench/eval.py: the two models disagree")


if __name__ == "__main__":
    main()
