"""The embedded default (`make demo`, `normistral demo`): the whole system, offline, at toy size.

Inside: `run_demo(workdir, steps)` and its steps, each the function behind a documented command:
 1. build the NorMistral-style tokenizer on the bundled corpus      normistral build-tokenizer
 2. write a random NorMistral-shaped Hugging Face checkpoint         (stands in for the downloaded model)
 3. import it to an Orbax checkpoint                                  normistral import-hf
 4. tokenize and pack the bundled corpus                               normistral prepare-data
 5. continue training it, stopping halfway and resuming               normistral train (run twice)
 6. export the trained weights to Hugging Face format                  (train.export_hf) / export-hf
 7. check transformers loads the export with the same logits           normistral parity
 8. translate with the model card's template, batched greedy,
    stopping at newlines                                               normistral generate --stop-at-newline
 then a summary and a loss-curve PNG.

The toy cannot translate: the bundled corpus carries English-Bokmål pairs written for the project in
the card's template, weighted up in the data mix, and the toy memorizes them. With the 11B checkpoint
and a TPU config the same commands translate anything.

PyTorch is optional (the [demo] extra does not install it: a plain `torch` from PyPI is a multi-GB CUDA
build). Without it, step 2 writes our own model's random initialization in the same Hugging Face format
instead of transformers', and step 7 (the comparison against transformers' PyTorch model) is skipped with
a line saying how to enable it; the summary's parity is then null.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time

import numpy as np

# The bundled corpus (package data of `training`) and config: both work after a plain `pip install`.
CORPUS = os.path.join(os.path.dirname(importlib.util.find_spec("training").origin), "corpus")
CONFIG = "demo"  # the bundled configs/demo.yaml (shipped inside the package: works after a plain pip install)
SOURCES = {"translation_pairs.jsonl": 0.5, "nb.jsonl": 0.3, "nn.jsonl": 0.1, "en.jsonl": 0.05, "se.jsonl": 0.05}
TEMPLATE = "Engelsk: {0}\nBokmål:"
TORCH_HINT = "pip install torch --index-url https://download.pytorch.org/whl/cpu"  # the CPU build: ~200 MB


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _random_hf_checkpoint(path: str, config) -> None:
    """The stand-in for the downloaded model: transformers' random MistralForCausalLM when PyTorch is
    installed, else our model's random initialization (normal(0.02), unit norms) in the same format."""
    if _has_torch():
        from jaxmodel.parity import make_hf_checkpoint

        make_hf_checkpoint(path, config, seed=0)
        return
    from jaxmodel.export import save_pretrained
    from jaxmodel.model import init_model

    save_pretrained(init_model(config, seed=0), path, progress=False)


def _step(number: int, text: str) -> None:
    print(f"\n[{number}/8] {text}", flush=True)


def translation_pairs(count: int) -> list[tuple[str, str]]:
    """(English, Bokmål) pairs from the bundled corpus, spread over the file."""
    with open(os.path.join(CORPUS, "translation_pairs.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    picked = [texts[i] for i in np.linspace(0, len(texts) - 1, count).astype(int)]
    out = []
    for text in picked:
        english, bokmal = text.split("\n")[:2]
        out.append((english.removeprefix("Engelsk: "), bokmal.removeprefix("Bokmål: ")))
    return out


def _plot(metrics: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics if m.get("loss") is not None]
    loss = [m["loss"] for m in metrics if m.get("loss") is not None]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, lw=1, label="training loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("normistral demo: continued training of the imported toy checkpoint")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parity(export: str) -> dict | None:
    """Step 7: the largest logit difference against transformers' PyTorch model; None without PyTorch."""
    if not _has_torch():
        print(f"  skipped: PyTorch is not installed (the reference runs on it); to enable it: {TORCH_HINT}")
        return None
    from jaxmodel.parity import compare_logits

    # Positions 0..255: the range the toy was trained on (far-out positions are covered by the tests on
    # random checkpoints; on a trained toy they only probe untrained, chaotic attention).
    parity = compare_logits(export, export, offset=0)
    print(f"  max |logit difference| = {parity['max_abs_logit_diff']:.2e} over {parity['tokens']} tokens "
          f"(logits up to {parity['max_abs_logit']:.1f} in magnitude)")
    return parity


def run_demo(workdir: str, *, steps: int = 300) -> dict:
    from inference.generator import Generator
    from jaxmodel.config import MistralConfig
    from jaxmodel.convert import copy_tokenizer_files, import_hf
    from jaxmodel.storage import StorageError
    from training.prepare import prepare_data
    from training.tokenizer import train_tokenizer
    from training.train import run_training

    t_start = time.time()
    if not isinstance(steps, int) or steps < 2:  # it stops halfway and resumes: two runs of one step at least
        raise ValueError(f"steps={steps!r}: the demo needs at least 2 training steps (it stops halfway and resumes)")
    work = os.path.abspath(workdir)
    marker = os.path.join(work, ".normistral-demo")
    if os.path.exists(work) and not os.path.isdir(work):
        raise StorageError(f"{workdir}: is a file, expected a directory for the demo (--workdir)")
    if os.path.isdir(work) and os.listdir(work) and not os.path.exists(marker):
        raise StorageError(f"{workdir}: exists and is not a previous demo directory; choose another --workdir")
    shutil.rmtree(work, ignore_errors=True)
    try:
        os.makedirs(work)
        open(marker, "w").close()
    except OSError as e:
        raise StorageError(f"{workdir}: cannot create the demo directory (--workdir): "
                           f"{(e.strerror or str(e)).lower()}") from None
    paths = {name: os.path.join(work, name) for name in
             ("tokenizer", "hf", "orbax", "data", "data-heldout", "run")}

    _step(1, "normistral build-tokenizer: byte-level BPE on the bundled corpus")
    corpus = [os.path.join(CORPUS, name) for name in SOURCES]
    train_tokenizer(corpus, paths["tokenizer"], vocab_size=2048)

    _step(2, "writing a random NorMistral-shaped Hugging Face checkpoint (stands in for the download)")
    config = MistralConfig.tiny(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    _random_hf_checkpoint(paths["hf"], config)
    copy_tokenizer_files(paths["tokenizer"], paths["hf"])  # a downloaded model directory carries its tokenizer
    print(f"  {config.num_params():,} parameters; GQA 8:2, head_dim 32 != 256/8, theta 1e6 (as NorMistral)")

    _step(3, f"normistral import-hf {paths['hf']} {paths['orbax']}")
    import_hf(paths["hf"], paths["orbax"])

    _step(4, "normistral prepare-data: tokenize and pack the corpus (128-token rows, translation pairs weighted up)")
    prepare_data(paths["tokenizer"], corpus, paths["data"], 128, weights=list(SOURCES.values()))
    prepare_data(paths["tokenizer"], [os.path.join(CORPUS, "heldout.jsonl")], paths["data-heldout"], 128)

    common = [f"model.init_from={paths['orbax']}", f"data.dir={paths['data']}",
              f"data.eval_dir={paths['data-heldout']}", f"train.steps={steps}"]
    half = steps // 2
    _step(5, f"normistral train --config configs/demo.yaml: steps 1-{half}, then stop")
    t_train = time.time()
    run_training(CONFIG, paths["run"], common + [f"train.steps={half}", "train.export_hf=null"])
    print(f"  ... rerunning the same command resumes from the step-{half} checkpoint and continues to {steps}")
    summary = run_training(CONFIG, paths["run"], common)
    train_seconds = time.time() - t_train
    with open(os.path.join(paths["run"], "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1)), "one metrics line per step"

    export = os.path.join(paths["run"], "hf")
    _step(6, f"exported the trained weights to {export} (Hugging Face format, with the tokenizer)")

    _step(7, "normistral parity: transformers (eager, float32) vs JAX on the exported checkpoint")
    parity = _parity(export)

    _step(8, f"translating a batch with the card's template {TEMPLATE!r}, greedy, stopping at newlines")
    pairs = translation_pairs(6)
    generator = Generator.from_pretrained(export, dtype="float32")
    outputs = generator.generate([english for english, _ in pairs], template=TEMPLATE, stop="\n",
                                 max_new_tokens=32)
    exact = 0
    for (english, expected), got in zip(pairs, outputs):
        exact += got == expected
        print(f"  Engelsk: {english}\n  Bokmål:  {got}   {'(as in the corpus)' if got == expected else ''}")
    print("  The toy model memorized these pairs from the bundled corpus; it cannot translate new sentences.\n"
          "  The same commands with the 11B checkpoint (normistral generate --template ... --stop-at-newline)"
          " translate anything.")

    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    tokens_per_s = float(np.median([m["tokens_per_s"] for m in metrics[5:] if m.get("tokens_per_s")]))
    _plot(metrics, os.path.join(work, "loss.png"))
    result = {
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "eval_loss": [m["eval_loss"] for m in metrics if "eval_loss" in m],
        "parity_max_abs_logit_diff": parity and parity["max_abs_logit_diff"], "tokens_per_s": tokens_per_s,
        "translations_exact": exact, "translations": len(pairs), "final_step": summary["step"],
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
        "loss_curve": os.path.join(work, "loss.png"),
    }
    with open(os.path.join(work, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print("\nSummary")
    print(f"  training loss      {result['loss_first10']:.3f} (first 10 steps) -> {result['loss_last10']:.3f} "
          f"(last 10); held-out {' -> '.join(f'{x:.3f}' for x in result['eval_loss'])}")
    if parity is None:
        print(f"  parity             skipped: PyTorch is not installed ({TORCH_HINT})")
    else:
        print(f"  parity             max |dlogit| {parity['max_abs_logit_diff']:.1e} vs transformers (bound 1e-4)")
    print(f"  throughput         {tokens_per_s:,.0f} training tokens/s (median step)")
    print(f"  translations       {exact}/{len(pairs)} memorized pairs reproduced exactly")
    print(f"  loss curve         {result['loss_curve']}")
    print(f"  total              {result['total_seconds']:.0f} s")
    parity_failed = parity is not None and parity["max_abs_logit_diff"] > 1e-4
    if parity_failed or not result["loss_last10"] < result["loss_first10"]:
        raise SystemExit("normistral: error: the demo's parity or loss check failed")
    return result
