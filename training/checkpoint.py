"""Training checkpoints: an Orbax `CheckpointManager` around the train state.

Inside: `Checkpointer` (save / latest_step / restore / wait / close) and `fault(name)`, the test-only
fault-injection hook.

Layout (one directory per saved step, written by Orbax):
    <checkpoint.dir>/<step>/params/      the parameters (float32 master weights), the same nested tree
                                         as an `import-hf` directory's params/ (Orbax PyTree); with a
                                         `lora:` section only the adapters (the frozen base is never saved)
    <checkpoint.dir>/<step>/opt_state/   optax state (Adam moments sharded like the params, counters)
    <checkpoint.dir>/<step>/progress/    {step, skipped, rng}: what else the next step depends on
    <checkpoint.dir>/<step>/meta/        JSON: the run's settings (model config, mesh, sections)
    <checkpoint.dir>/<step>/model_config/ JSON: the model's config.json dict, the item jaxmodel's model-
                                         directory layout names (`jaxmodel.convert.MODEL_CONFIG_ITEM`), so
                                         `from_pretrained` / `export-hf` read a step like an import-hf dir
The data position needs no saving: batches are a pure function of the step (training/data.py).

Design choices:
- Saves are asynchronous: `save` returns once the arrays are copied to host memory (Orbax's blocking
  phase), and the write to storage overlaps the next steps; so the next step may donate the state's
  device buffers right away.
- A step directory is written under a temporary name (`<step>.orbax-checkpoint-tmp-*`) and renamed when
  complete; Orbax lists only finalized steps, so a run killed mid-save resumes from the previous
  checkpoint, and the leftover temporary directory is deleted when the manager opens
  (`cleanup_tmp_directories`). On gs:// (no rename) Orbax writes the step directory in place and its
  `commit_success.txt`, written last, is the commit marker: a step without it is not listed.
- Retention: the newest `keep` checkpoints, plus every step that is a multiple of `keep_period`, forever.
- Restoring takes abstract arrays carrying the *current* mesh's shardings: Orbax reads each device's
  slice, so a run saved on one mesh shape resumes on another.
"""

from __future__ import annotations

import os
import signal

import orbax.checkpoint as ocp

from jaxmodel import storage
from jaxmodel.convert import MODEL_CONFIG_ITEM
from training.config import CheckpointConfig

ITEMS = ("params", "opt_state", "progress")


def latest_finalized_step(directory: str) -> int | None:
    """The newest finalized checkpoint step in `directory`, from a listing (no Orbax manager, nothing
    created): a temporary `<step>.orbax-checkpoint-tmp-*` directory is not a step, nor, on gs://, one without
    Orbax's commit marker. OSError when `directory` cannot be listed."""
    steps = sorted((int(name) for name in storage.listdir(directory) if name.isdigit()), reverse=True)
    for step in steps:
        if not storage.is_remote(directory) or storage.exists(storage.join(directory, str(step), "commit_success.txt")):
            return step
    return None


def fault(name: str) -> int | None:
    """The step at which the test-only fault `name` fires, from NORMISTRAL_FAULTS="name=step,...".
    Unset in real runs. kill_after_save=N: SIGKILL right after the step-N save was started (the async
    write still in flight); kill_at_step=N: SIGKILL after step N once no save is in flight;
    nan_at_step=N: step N's loss weights are NaN; sigterm_at_step=N: SIGTERM to itself after step N
    (training/train.py)."""
    for item in os.environ.get("NORMISTRAL_FAULTS", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name and value.strip():
            return int(value)
    return None


class Checkpointer:
    def __init__(self, directory: str, cfg: CheckpointConfig, meta: dict | None = None,
                 model_config: dict | None = None):
        self.model_config = model_config  # config.json's dict, saved as MODEL_CONFIG_ITEM (when given)
        self.directory = storage.resolve(directory)  # a local path or a gs:// URL (Orbax takes both)
        self.cfg = cfg
        self.meta = meta or {}
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, keep_period=cfg.keep_period, enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest *finalized* checkpoint (Orbax ignores temporary directories)."""
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, *, force: bool = False) -> bool:
        """Starts saving `state` ({params, opt_state, step, skipped, rng}) as `step`; returns whether a
        save was started (the manager skips a step it already holds)."""
        progress = {k: state[k] for k in ("step", "skipped", "rng")}
        items = dict(params=ocp.args.StandardSave(state["params"]), opt_state=ocp.args.StandardSave(state["opt_state"]),
                     progress=ocp.args.StandardSave(progress), meta=ocp.args.JsonSave(self.meta))
        if self.model_config is not None:
            items[MODEL_CONFIG_ITEM] = ocp.args.JsonSave(self.model_config)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if fault("kill_after_save") == step:  # tests: die while this save is (most likely) in flight
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    def restore(self, step: int, abstract_state: dict) -> dict:
        """The state saved at `step`, placed per the shardings carried by `abstract_state`'s leaves."""
        progress = {k: abstract_state[k] for k in ("step", "skipped", "rng")}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
            progress=ocp.args.StandardRestore(progress)))
        return {"params": restored.params, "opt_state": restored.opt_state, **restored.progress}

    def restore_meta(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
