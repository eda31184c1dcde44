"""Training metrics: the FLOP count behind MFU, peak FLOP/s per chip, and the per-step log writers.

Inside: `matmul_params(config)`, `train_flops_per_step(config, batch, seq_len)`, `PEAK_FLOPS`,
`peak_flops(device, override)`, `MetricsLog` (metrics.jsonl + optional TensorBoard).

FLOPs per optimizer step (what MFU divides by the step time and the chips' peak), with B sequences of
T tokens, L layers, N query heads of width H:
    6 * P * B * T  +  6 * L * B * T^2 * N * H
- P = the parameters that take part in matmuls: per layer q, k, v, o and the three MLP matrices, plus
  the output projection (lm_head, or the tied embedding used as one). The input embedding is a lookup,
  not a matmul, and RMSNorm scales are elementwise: neither is counted. 6 = 2 FLOPs per multiply-add x
  (forward + backward, the backward costing twice the forward).
- Attention scores and the weighted sum: 2 matmuls x 2 FLOPs x T^2 x N x H per layer and sequence in the
  forward pass for a full T x T score matrix, x3 with the backward = 12 L B T^2 N H; causal attention
  needs half of it, hence 6. This counts the full causal triangle of each packed sequence even when
  segment masks make documents attend to less (the usual convention, and what flash/splash kernels that
  skip only fully masked blocks roughly execute).
- Not counted: recomputation (remat and the loss's chunk recompute: MFU, not hardware FLOPs
  utilization), the masked-prediction steps' bidirectional attention (counted as causal), elementwise
  work, and the optimizer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

from jaxmodel import storage
from jaxmodel.config import MistralConfig

# Dense bf16 peak FLOP/s per chip (public specifications), by jax `device_kind`.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
}


def matmul_params(config: MistralConfig) -> int:
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    n, k = config.num_attention_heads, config.num_key_value_heads
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
    return config.num_hidden_layers * per_layer + d * config.vocab_size


def train_flops_per_step(config: MistralConfig, batch: int, seq_len: int) -> float:
    """6 P B T + 6 L B T^2 N H (see the module docstring)."""
    dense = 6.0 * matmul_params(config) * batch * seq_len
    attention = 6.0 * config.num_hidden_layers * batch * seq_len**2 * config.num_attention_heads * config.head_dim
    return dense + attention


def peak_flops(device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device: the config's value, else the table's, else None (no MFU, e.g. CPU)."""
    if override:
        return float(override)
    kind = getattr(device, "device_kind", "")
    for name, value in PEAK_FLOPS.items():
        if kind == name:
            return value
    return None


class MetricsLog:
    """One JSON object per line in `<workdir>/metrics.jsonl` (process 0 only), mirrored to TensorBoard
    (`<workdir>/tensorboard`) when tensorboardX (or torch's tensorboard writer) can be imported.

    A gs:// workdir: an object store has no append, so both are written on local scratch and uploaded
    whole by `sync()`, which the trainer calls before each checkpoint save (every line up to a checkpoint
    is stored before the checkpoint is), and which also runs every SYNC_SECONDS and at close. A resumed
    run starts from the uploaded file."""

    SYNC_SECONDS = 60.0

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0, log=print):
        self.path = storage.join(workdir, "metrics.jsonl")
        self.remote = storage.is_remote(workdir)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if self.remote:
            self._scratch = tempfile.mkdtemp(prefix="normistral-metrics-")
            self._local, self._tb_local = (os.path.join(self._scratch, n) for n in ("metrics.jsonl", "tensorboard"))
            self._tb_remote = storage.join(workdir, "tensorboard")
            if storage.exists(self.path):
                storage.copy_file(self.path, self._local)
        else:
            self._local, self._tb_local = self.path, os.path.join(workdir, "tensorboard")
        self._truncate(resume_step)
        self.file = open(self._local, "a", encoding="utf-8")
        self.tb = _tensorboard_writer(self._tb_local, log)
        self._synced = time.monotonic()

    def _truncate(self, step: int) -> None:
        """Drops lines past `step` (written after the checkpoint a resumed run starts from), so that the
        file keeps exactly one line per step however often the run was interrupted."""
        if not os.path.exists(self._local):
            return
        with open(self._local, encoding="utf-8") as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
        if len(kept) != len(lines):
            tmp = self._local + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self._local)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite value (the loss of a skipped step) is written as null, never NaN.
        strict = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(strict, allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tag = "eval/loss" if key == "eval_loss" else key if key.startswith("eval/") else f"train/{key}"
                    self.tb.add_scalar(tag, value, record["step"])
        if self.remote and time.monotonic() - self._synced > self.SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        """Uploads metrics.jsonl and the TensorBoard event files (gs:// workdirs; a no-op locally)."""
        if not (self.enabled and self.remote):
            return
        self.file.flush()
        storage.copy_file(self._local, self.path)
        if self.tb is not None:
            self.tb.flush()
            for name in os.listdir(self._tb_local) if os.path.isdir(self._tb_local) else []:
                storage.copy_file(os.path.join(self._tb_local, name), storage.join(self._tb_remote, name))
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self.sync()  # flushes both, then uploads (gs://)
        if self.tb is not None:
            self.tb.close()
        self.file.close()
        if self.remote:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self.enabled = False


def _tensorboard_writer(logdir: str, log):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package too
        except ImportError:
            log("note: TensorBoard logging is off (neither tensorboardX nor tensorboard is installed); "
                "metrics.jsonl has every value")
            return None
    return SummaryWriter(logdir)


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
