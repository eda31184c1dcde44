"""The lm-eval model `normistral` against lm-eval's own `hf` model (HFLM) on the same float32 checkpoint.

Both run in this process on the tiny checkpoint of conftest.py with max_length=64 (so contexts are
truncated from the left and documents span several rolling windows) and small packed rows (so requests
share rows and batches). Offline: the tasks are the project's Norwegian YAMLs in eval_tasks/ with local
data files; nothing comes from the hub.
"""

import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = os.path.join(REPO, "tests", "inference", "eval_tasks")
MAX_LENGTH = 64

CONTEXTS = [
    "Hei på deg, hvordan går det?",
    "Tekst: Maten var nydelig.\nSentiment:",
    "Engelsk: I like cheese.\nBokmål: ",  # a trailing space moves to the continuation (TemplateLM's rule)
    "Nordavinden og sola kranglet om hvem av dem som var sterkest. Da kom det en mann gående med en varm "
    "kappe på seg.",  # longer than the window: truncated from the left
    "",  # empty context: the prefix (BOS) token
]
CONTINUATIONS = [" Bare bra, takk.", " positiv", "Jeg liker ost.", "x"]


pytestmark = pytest.mark.usefixtures("repo_cwd")  # the task YAMLs name data relative to the repo


@pytest.fixture(scope="module")
def hflm(tiny_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=tiny_dir, dtype="float32", batch_size=4, device="cpu", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def ours(tiny_dir):
    from inference.lm_eval_adapter import NorMistralLM

    return NorMistralLM(pretrained=tiny_dir, dtype="float32", batch_size=4, max_length=MAX_LENGTH, min_row=32)


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_matches_hflm(hflm, ours):
    requests = _instances("loglikelihood", [(c, x) for c in CONTEXTS for x in CONTINUATIONS])
    expected, got = hflm.loglikelihood(requests), ours.loglikelihood(requests)
    assert len(got) == len(expected) == 20
    np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], atol=1e-4, rtol=0)
    assert [g[1] for g in got] == [e[1] for e in expected]
    assert len({round(g[0], 3) for g in got}) > 15  # real, distinct numbers


def test_greedy_flags_match_hflm(hflm, ours, hf_model):
    """Continuations that are the model's own greedy tokens (flag True) and the same with one token
    changed (False), as token requests straight into _loglikelihood_tokens (no retokenization)."""
    import torch

    rng = np.random.default_rng(0)
    requests = []
    for n, (ctx_len, cont_len) in enumerate([(5, 1), (12, 3), (30, 6), (70, 4), (3, 9)]):
        context = [1] + rng.integers(4, hf_model.config.vocab_size, size=ctx_len).tolist()
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([context]), max_new_tokens=cont_len, do_sample=False)
        greedy = out[0, len(context):].tolist()
        wrong = list(greedy)
        wrong[-1] = (wrong[-1] + 1) % hf_model.config.vocab_size
        requests += [((f"g{n}", ""), context, greedy), ((f"w{n}", ""), context, wrong)]
    expected, got = hflm._loglikelihood_tokens(requests), ours._loglikelihood_tokens(requests)
    np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], atol=1e-4, rtol=0)
    flags = [g[1] for g in got]
    assert flags == [e[1] for e in expected]
    # The (70, 4) request is cut to the window, and greedy was computed on the full context: HF decides.
    assert flags[0::2].count(True) >= 4 and not any(flags[1::2])


def test_loglikelihood_rolling_matches_hflm(hflm, ours):
    from lm_eval import utils

    texts = [CONTEXTS[3] * 3, "Jeg liker ost.", "Oslo er hovedstaden i Norge. " * 8, "a"]
    windows = [len(list(utils.get_rolling_token_windows(ours.tok_encode(t), ours.prefix_token_id, MAX_LENGTH, 1)))
               for t in texts]
    assert max(windows) >= 3  # several windows, the overlap rule matters
    requests = _instances("loglikelihood_rolling", [(t,) for t in texts])
    # Each total sums hundreds of float32 token log-probabilities (each within 1e-4 of HF's, as above), so the
    # bound also scales with the total: a few float32 ulps of -1,114 are ~1e-4 by themselves.
    np.testing.assert_allclose(ours.loglikelihood_rolling(requests), hflm.loglikelihood_rolling(requests),
                               atol=1e-4, rtol=1e-6)


def test_generate_until_matches_hflm(hflm, ours):
    """Identical strings for newline stops, stop strings that do occur in the output (taken from an
    unconstrained run, so rows are cut mid-generation) and different max_gen_toks."""
    prompts = [CONTEXTS[0], CONTEXTS[1], "Engelsk: Where is the train station?\nBokmål:", CONTEXTS[3] * 2]
    free = hflm.generate_until(_instances("generate_until", [(p, {"until": [], "max_gen_toks": 12}) for p in prompts]))
    stops = [text[len(text) // 2: len(text) // 2 + 2] for text in free]
    args = [(p, {"until": ["\n"], "max_gen_toks": 10}) for p in prompts]
    args += [(p, {"until": [s, "\n"], "max_gen_toks": 12}) for p, s in zip(prompts, stops)]
    args += [(p, {"until": "</s>", "max_gen_toks": 5}) for p in prompts[:2]]
    requests = _instances("generate_until", args)
    expected, got = hflm.generate_until(requests), ours.generate_until(requests)
    assert got == expected
    cut = got[len(prompts):2 * len(prompts)]
    assert all(len(c) < len(f) for c, f in zip(cut, free))  # the stop strings did stop them


def test_task_metrics_match_hflm(hflm, tiny_dir):
    """The three task kinds through lm_eval.simple_evaluate, `normistral` by its registered name: the same
    per-request responses and the same task metrics as HFLM (few-shot contexts exceed the window)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from inference import eval_tasks, lm_eval_adapter

    assert lm_eval.api.registry.get_model("normistral") is lm_eval_adapter.NorMistralLM
    tasks = ["nm_sentiment", "nm_perplexity", "nm_translate"]
    common = dict(tasks=tasks, num_fewshot=2, task_manager=TaskManager(include_path=TASKS), log_samples=True,
                  bootstrap_iters=0)
    theirs = lm_eval.simple_evaluate(model=hflm, **common)
    mine = lm_eval.simple_evaluate(model="normistral", model_args=f"pretrained={tiny_dir},dtype=float32,"
                                   f"max_length={MAX_LENGTH},batch_size=4,min_row=32", **common)
    for task in tasks:
        for a, b in zip(theirs["samples"][task], mine["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                if isinstance(ra[0], str):
                    assert ra == rb
                else:
                    ra, rb = ra[0] if isinstance(ra[0], tuple) else ra, rb[0] if isinstance(rb[0], tuple) else rb
                    # rolling log-likelihoods are sums over whole documents (~-800): float32's resolution
                    # there is ~6e-5, so the bound is 1e-4 plus one part in a million of the value
                    np.testing.assert_allclose(np.asarray(rb, float), np.asarray(ra, float), atol=1e-4, rtol=1e-6)
        expected, got = eval_tasks.scores({"results": {task: theirs["results"][task]}}), \
            eval_tasks.scores({"results": {task: mine["results"][task]}})
        assert got.keys() == expected.keys() and got
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), key
    assert mine["results"]["nm_sentiment"]["acc,none"] == theirs["results"]["nm_sentiment"]["acc,none"]
    assert theirs["results"]["nm_translate"]["chrf,none"] > 0


def test_packing_shares_rows_and_keeps_every_request():
    """Every request is scored once at the right positions of a segment holding its exact input; choices
    of one question share a segment; several segments share a row."""
    from inference.scoring import ScoreRequest, pack

    rng = np.random.default_rng(1)
    requests = []
    for _ in range(40):  # questions with 3 choices of 1-3 tokens (one-token choices share the bare context)
        context = rng.integers(1, 50, size=rng.integers(1, 70)).tolist()
        requests += [ScoreRequest(context, rng.integers(1, 50, size=rng.integers(1, 4)).tolist()) for _ in range(3)]
    batches = pack(requests, max_length=64, batch_size=4, min_row=64)
    owners = [i for b in batches for row in b.owners for i in row]
    assert sorted(owners) == list(range(len(requests)))
    segments = sum(int(b.segment_ids[r].max()) for b in batches for r in range(len(b.owners)))
    assert segments < len(requests) - 20  # shared segments
    assert len(batches) * 4 < segments  # shared rows
    for b in batches:
        rows, length = b.ids.shape
        assert length in (16, 32, 64) and rows in (1, 2, 4)
        for r, row in enumerate(b.owners):
            for slot, i in enumerate(row):
                whole = (requests[i].context + requests[i].continuation)[-65:][:-1]
                scored = b.score_index[r, b.slots[r] == slot]
                seg = b.segment_ids[r, scored[0]]
                start = int(np.argmax(b.segment_ids[r] == seg))
                assert b.ids[r, start:start + len(whole)].tolist() == whole
                assert b.positions[r, start:start + len(whole)].tolist() == list(range(len(whole)))
                assert (b.segment_ids[r, start:start + len(whole)] == seg).all()
                n = len(requests[i].continuation)
                assert scored.tolist() == list(range(start + len(whole) - n, start + len(whole)))
                assert b.targets[r, b.slots[r] == slot].tolist() == requests[i].continuation


def test_int8_weights_score_close_to_float(tiny_dir, ours):
    """quantize=int8 goes through the same scoring path (the embedding read through its QArray)."""
    from inference.lm_eval_adapter import NorMistralLM

    int8 = NorMistralLM(pretrained=tiny_dir, dtype="float32", quantize="int8", batch_size=4, max_length=MAX_LENGTH,
                        min_row=32)
    requests = _instances("loglikelihood", [(c, x) for c in CONTEXTS[:3] for x in CONTINUATIONS])
    full, quant = np.array([r[0] for r in ours.loglikelihood(requests)]), \
        np.array([r[0] for r in int8.loglikelihood(requests)])
    assert np.all(np.abs(quant - full) <= 0.02 * np.abs(full) + 0.05) and np.any(quant != full)


def test_lm_eval_command_line_with_model_normistral(tiny_dir):
    """lm-eval's own command line (`lm_eval --model normistral ...`), through the module that registers it.
    (lm-eval's command line passes --batch_size itself: batch_size in --model_args would clash.)"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "inference.lm_eval_adapter", "--model", "normistral", "--model_args",
                           f"pretrained={tiny_dir},dtype=float32,max_length={MAX_LENGTH}", "--batch_size", "4",
                           "--tasks", "nm_sentiment", "--include_path", TASKS, "--limit", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "normistral" in proc.stdout and "nm_sentiment" in proc.stdout and "acc" in proc.stdout
