"""lm-eval tasks before and around a model: `check_tasks` (every task exists and its data loads),
`check_task_settings` (few-shot count and generation room), both before the model loads, so a typo costs
seconds; `evaluate(lm, tasks, ...)` (a thin wrapper over `lm_eval.simple_evaluate`); `scores` (a results
dict as flat "task/metric" numbers); `EvalError` and `arg_text` (how the user spelled an argument), shared
with inference/lm_eval_adapter.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lm_eval.models.utils import normalize_gen_kwargs


class EvalError(ValueError):
    """An evaluation that cannot run as asked (one line naming the culprit)."""


def arg_text(name: str, value, cli: bool) -> str:
    """How the user spelled an argument: `--max-length 4` (normistral eval) or `max_length=4` (model_args)."""
    return f"--{name.replace('_', '-')} {value}" if cli else f"{name}={value!r}"


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_tasks(tasks: Sequence[str], include_path: str | None = None):
    """(TaskManager, loaded tasks) after checking every task exists and its data loads; EvalError if not.
    Runs before the model is loaded, so a typo or a missing dataset costs seconds, not a model load."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise EvalError("no tasks given (--tasks T1,T2)")
    if include_path is not None and not os.path.isdir(include_path):
        raise EvalError(f"{include_path}: task directory not found (--include-path)")
    manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not os.path.isfile(t)]
    if unknown:
        raise EvalError(f"unknown task(s): {', '.join(unknown)} (list them with `lm_eval ls tasks`"
                        + (f"; --include-path {include_path} was searched too)" if include_path else ")"))
    try:
        loaded = manager.load(list(tasks))
    except Exception as e:  # noqa: BLE001 (datasets raises many types; the user needs the first line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = " (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if _offline() else ""
        raise EvalError(f"task(s) {', '.join(tasks)}: could not load the data: {type(e).__name__}: "
                        f"{first}{hint}") from None
    return manager, loaded


def _leaf_tasks(loaded):
    """The tasks of a TaskManager.load() result (groups are dicts of their members, nested)."""
    for value in loaded.values():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        elif value is not None:
            yield value


def check_task_settings(loaded, *, num_fewshot: int | None = None, max_length: int | None = None,
                        max_gen_toks: int = 256, cli: bool = False) -> None:
    """Settings the loaded tasks cannot honour, refused before the model loads (lm-eval would fail later with
    a traceback): more few-shot examples than a task has to draw from, and a generation task whose
    max_gen_toks leaves no room for a prompt in max_length."""
    for task in _leaf_tasks(loaded):
        name = task.config.task
        if num_fewshot:
            pool = task.fewshot_docs()
            available = len(pool) if pool is not None else 0
            # lm-eval draws one more when the examples come from the split being evaluated (it drops the
            # document being asked about).
            fewshot_split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
            same_split = fewshot_split is not None and fewshot_split == task.config.test_split
            if num_fewshot + same_split > available:
                raise EvalError(f"{arg_text('num_fewshot', num_fewshot, cli)}: task {name} has only {available} "
                                f"documents to draw few-shot examples from")
        if max_length is not None and task.config.output_type == "generate_until":
            gen = normalize_gen_kwargs(dict(task.config.generation_kwargs or {}), max_gen_toks)["max_gen_toks"]
            if int(gen) >= max_length:
                raise EvalError(f"{arg_text('max_length', max_length, cli)}: leaves no room for a prompt in "
                                f"task {name}, which generates up to {gen} tokens (max_gen_toks)")


def evaluate(lm, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: float | None = None,
             include_path: str | None = None, log_samples: bool = False, task_manager=None, **kwargs) -> dict:
    """`lm_eval.simple_evaluate` for an lm-eval model (a NorMistralLM, or any lm-eval LM); returns its
    results dict. Tasks are checked first (check_tasks) unless a task_manager is given."""
    import lm_eval

    # lm-eval bootstraps stderrs in a fork()ed process pool, which can deadlock a process running JAX's
    # threads; this switch (lm-eval's own) makes it bootstrap in-process.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    if task_manager is None:
        task_manager, _ = check_tasks(tasks, include_path)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=task_manager, log_samples=log_samples, **kwargs)


def scores(results: dict) -> dict[str, float]:
    """Flat {"task/metric": value} of a results dict's numbers (stderr and non-numbers left out)."""
    out = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key in ("sample_len",):
                continue
            out[f"{task}/{key.replace(',none', '')}"] = float(value)
    return out
