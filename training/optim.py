"""The optimizer: AdamW with decoupled weight decay, global-norm clipping and a learning-rate schedule.

Inside: `learning_rate_schedule(opt, steps)`, `decay_mask(model, wrt)`, `make_optimizer(opt, steps, model, wrt)`,
`optimizer_shardings(optimizer, params, param_shardings, replicated)`.

Design choices:
- Weight decay (0.1, decoupled, scaled by the learning rate as in AdamW) applies to every matrix,
  embeddings and lm_head included (NorMistral's recipe decays all matrices; `decay_embeddings: false`
  exempts `embed_tokens` and `lm_head`), and never to the RMSNorm scales: decaying a gain towards zero
  fights the normalisation. The mask is read from each parameter's logical axis names (`norm`,
  `vocab`), not from its path, so it follows the model if it grows new parameters.
- Gradient clipping to a global norm runs before Adam (`clip_by_global_norm` then `adamw`), on the
  gradient already divided by the token count of the whole batch.
- Master weights: the parameters (and both Adam moments) are float32 whatever the compute dtype; the
  model casts each weight to its activation dtype (bfloat16 on accelerators) inside the einsums, so the
  gradients reaching the optimizer are float32 too.
- Schedules are optax's: `warmup_constant_schedule`, `warmup_cosine_decay_schedule`, and `join_schedules`
  for warmup-stable-decay. optax's warmup schedules with `warmup_steps=0` stay at their initial value
  forever, so zero warmup is built without the warmup piece.
- LoRA (`wrt=jaxmodel.lora.TRAINABLE`): the optimizer sees only the adapters, so the frozen base has no
  moments at all; weight decay then applies to every adapter matrix (as torch.optim.AdamW over PEFT's
  trainable parameters).
- Gradient accumulation is not an optax wrapper: the train step scans over microbatches and calls this
  optimizer once per step (training/step.py), so one step is one update and the schedule counts updates.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from training.config import OptimizerConfig


def learning_rate_schedule(opt: OptimizerConfig, steps: int) -> optax.Schedule:
    """The learning rate after `count` applied updates, for a run of `steps` updates."""
    peak, warmup = float(opt.learning_rate), opt.warmup_steps
    end = peak * opt.end_lr_ratio
    if opt.schedule == "constant":
        return optax.warmup_constant_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end)
    # Warmup-stable-decay: linear warmup, flat, then a linear decay over the last decay_steps updates.
    decay = opt.decay_steps or max(1, steps // 10)
    stable_end = max(warmup, steps - decay)
    pieces, boundaries = [], []
    if warmup:
        pieces.append(optax.linear_schedule(0.0, peak, warmup))
        boundaries.append(warmup)
    pieces.append(optax.constant_schedule(peak))
    boundaries.append(stable_end)
    pieces.append(optax.linear_schedule(peak, end, decay))
    return optax.join_schedules(pieces, boundaries)


def decay_mask(model: nnx.Module, *, decay_embeddings: bool = True, wrt=nnx.Param) -> dict:
    """Pure-dict tree of bools (the structure of the parameters `wrt` selects): True where weight decay applies."""
    state = nnx.state(model, wrt)

    def decays(var) -> bool:
        axes = tuple(var.get_metadata().get("out_sharding") or ())
        if "norm" in axes:
            return False
        return decay_embeddings or "vocab" not in axes

    return nnx.to_pure_dict(jax.tree.map(decays, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def make_optimizer(opt: OptimizerConfig, steps: int, model: nnx.Module, wrt=nnx.Param) -> optax.GradientTransformation:
    """clip_by_global_norm -> adamw(schedule, mask) over the parameters `wrt` selects; `model` (abstract is
    fine) supplies the decay mask."""
    schedule = learning_rate_schedule(opt, steps)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=decay_mask(model, decay_embeddings=opt.decay_embeddings, wrt=wrt))
    if opt.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)


def optimizer_shardings(optimizer: optax.GradientTransformation, abstract_params, param_shardings, replicated):
    """The optimizer state's shardings: each moment like its parameter, counters replicated."""
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_state, param_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
