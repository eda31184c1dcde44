"""The train state, its shardings, and the jitted train and eval steps.

Inside:
- `TrainSetup` (`setup(run, mesh)`): graphdef, optimizer, schedule and every sharding of a run.
- `abstract_state`, `init_state` (random init, sharded at creation) and `state_from_params`
  (from loaded weights), `put_batch` (host numpy -> global arrays; under a mesh with context > 1 each
  sequence in jaxmodel.context_parallel's balanced token order), `batch_part` / `BatchPart` (the rows and
  sequence columns of the batch a process's devices hold: all a host reads, training/data.py).
- `make_train_step` / `make_eval_step`: pure functions of (state, batch), jitted with explicit
  in/out shardings, the state donated.

The train state is a plain dict pytree, which is what is checkpointed (all but `frozen`):
    params     the model's parameters as a nested dict (nnx.to_pure_dict; model.param_dtype: float32
               master weights, or bfloat16 ones updated by a float32 update rounded once per step);
               with a `lora:` section only the adapters (training/lora_train.py)
    frozen     LoRA only: the frozen base (possibly int8/int4 QArrays), passed through unchanged
    opt_state  optax state; Adam moments have the params' structure and shardings, float32 always
    step       int32, optimizer steps taken (skipped ones included: the data position)
    skipped    int32, steps whose update was dropped because the loss or a gradient was not finite
    rng        uint32[2], the run's key data; step t uses fold_in(key, t), so no key is ever carried forward

One step (`make_train_step`):
1. the global batch [B, T] is split into `train.microbatches` parts (rows m, m+M, m+2M, ...: each part
   keeps the batch axis sharded over data x fsdp); a `lax.scan` runs forward + backward on each and adds
   up float32 gradients, the loss sum and the token count (no optax.MultiSteps: one step = one update);
2. with probability `train.mntp_probability` (one coin per step, from the step's key) the step uses
   masked next-token prediction with bidirectional attention instead (training/loss.py), via `lax.cond`;
3. gradients and loss are divided once by the number of loss tokens of the whole batch, so accumulation
   changes nothing but memory; the global gradient norm is measured (before clipping);
4. if loss and gradient norm are finite, the optimizer updates params and opt_state; otherwise both are
   kept bit-for-bit (`lax.cond`) and `skipped` grows. `nonfinite: abort` is decided on the
   host from the returned flag; either way no non-finite value ever enters the state.

Context parallelism (mesh `context` > 1): the batch is [B, T] with T split over `context`, its tokens in
the balanced order (`put_batch`); the forward and the loss are per token, so only the masked objective,
whose spans follow the sequence, computes its corruption in sequence order and permutes it back.
The step functions trace under the run's mesh (whoever calls them), so the model sees its `context` axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmodel.context_parallel import balance, balanced_order, context_size, unbalance
from jaxmodel.lora import TRAINABLE, set_lora_dropout_key
from jaxmodel.model import MistralForCausalLM, abstract_model
from jaxmodel.sharding import auto_mesh, constrain, logical_to_spec, model_shardings
from training import lora_train
from training.config import RunConfig
from training.loss import MaskingConfig, cross_entropy_sums, mask_for_mntp
from training.optim import learning_rate_schedule, make_optimizer, optimizer_shardings

BATCH_KEYS = ("input_ids", "segment_ids", "positions", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    run: RunConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    abstract_params: dict  # ShapeDtypeStructs (no shardings)
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: dict
    batch_sharding: NamedSharding
    abstract_frozen: dict | None = None  # LoRA: the frozen base's ShapeDtypeStructs, with shardings


def setup(run: RunConfig, mesh: Mesh) -> TrainSetup:
    mesh = auto_mesh(mesh)
    model = abstract_model(run.model) if run.lora is None else lora_train.abstract_lora_model(run)
    graphdef, state, frozen = lora_train.split(model)
    abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
    if frozen is None:
        param_shardings = nnx.to_pure_dict(model_shardings(model, mesh))
        optimizer = make_optimizer(run.optimizer, run.train.steps, model)
    else:  # LoRA: params, gradients and optimizer state are the adapters'
        param_shardings = lora_train.variable_shardings(state, mesh)
        optimizer = make_optimizer(run.optimizer, run.train.steps, model, wrt=TRAINABLE)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = {
        "params": param_shardings,
        "opt_state": optimizer_shardings(optimizer, abstract_params, param_shardings, replicated),
        "step": replicated, "skipped": replicated, "rng": replicated,
    }
    abstract_frozen = None if frozen is None else lora_train.abstract_frozen(run, mesh)
    if abstract_frozen is not None:
        state_shardings["frozen"] = jax.tree.map(lambda s: s.sharding, abstract_frozen)
    shape = (run.train.global_batch_size, run.train.seq_len)
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", "length"), shape, mesh))
    return TrainSetup(run, mesh, graphdef, abstract_params, optimizer,
                      learning_rate_schedule(run.optimizer, run.train.steps), state_shardings, batch_sharding,
                      abstract_frozen)


def _init_opt_state(ts: TrainSetup, params):
    """The optimizer state with float32 moments whatever the param dtype: the float32 gradients then give
    float32 moments at every step, so the state's dtypes never change (a `lax.cond` over the update needs
    both branches alike), and bfloat16 parameters still accumulate their updates in float32 moments."""
    return ts.optimizer.init(jax.tree.map(lambda p: p.astype(jnp.float32), params))


def abstract_state(ts: TrainSetup) -> dict:
    """The train state as ShapeDtypeStructs carrying their shardings (for restores and AOT compiles)."""
    opt = jax.eval_shape(lambda p: _init_opt_state(ts, p), ts.abstract_params)
    shapes = {"params": ts.abstract_params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32),
              "skipped": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    sh = {k: v for k, v in ts.state_shardings.items() if k != "frozen"}
    out = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sh)
    return out if ts.abstract_frozen is None else {**out, "frozen": ts.abstract_frozen}


def _rng(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))


def state_from_params(ts: TrainSetup, params: dict) -> dict:
    """A fresh train state (step 0) around parameters already placed on the mesh (LoRA: the adapters; the
    caller adds `frozen`)."""
    sh = {k: v for k, v in ts.state_shardings.items() if k != "frozen"}

    def fresh(params):
        return {"params": params, "opt_state": _init_opt_state(ts, params), "step": jnp.zeros((), jnp.int32),
                "skipped": jnp.zeros((), jnp.int32), "rng": _rng(ts.run.train.seed)}

    with jax.set_mesh(ts.mesh):
        return jax.jit(fresh, in_shardings=(sh["params"],), out_shardings=sh)(params)


def init_state(ts: TrainSetup) -> dict:
    """Random initialization (normal(0.02), unit norms) created directly in its sharding."""
    cfg, seed = ts.run.model, ts.run.train.seed

    def init():
        return nnx.to_pure_dict(nnx.split(MistralForCausalLM(cfg, rngs=nnx.Rngs(seed)))[1])

    with jax.set_mesh(ts.mesh):
        params = jax.jit(init, out_shardings=ts.state_shardings["params"])()
    return state_from_params(ts, params)


@dataclasses.dataclass(frozen=True)
class BatchPart:
    """The part of the global [B, T] batch that some devices hold: batch rows `rows` x sequence columns
    `columns` (both sorted int64; columns in sequence order, whatever order the devices hold them in)."""

    rows: np.ndarray
    columns: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), len(self.columns)


def batch_part(sharding: NamedSharding, shape: tuple[int, int], devices=None) -> BatchPart:
    """The rows and sequence columns of the global batch (`shape` [B, T], as `put_batch` places it under
    `sharding`) that `devices` hold (default: this process's). Each device's slice comes from the sharding
    itself; under a `context` axis a device's columns are its positions in the balanced order, mapped back
    to the sequence's (two mirrored chunks per context shard). A pure function of the mesh and the devices,
    so every process can tell what every other reads."""
    if devices is None:
        return _local_part(sharding, tuple(shape))
    devices, order = set(devices), _token_order(shape[1], context_size(sharding.mesh))
    rows, columns = set(), set()
    for device, (r, c) in sharding.devices_indices_map(shape).items():
        if device in devices:
            rows.update(range(shape[0])[r])
            columns.update(order[c].tolist())
    return BatchPart(np.array(sorted(rows), np.int64), np.array(sorted(columns), np.int64))


@functools.cache
def _local_part(sharding: NamedSharding, shape: tuple[int, int]) -> BatchPart:
    return batch_part(sharding, shape, sharding.addressable_devices)


def _token_order(length: int, context: int) -> np.ndarray:
    """Each position's sequence column, in the order the devices hold the tokens (balanced under context)."""
    return np.arange(length) if context == 1 else balanced_order(length, context)


def put_batch(ts: TrainSetup, batch: dict, part: BatchPart | None = None) -> dict:
    """This process's part of the batch (numpy [rows, columns] of `part`, default `batch_part` of the batch
    sharding: with one process, the whole [B, T] batch) -> global [B, T] arrays sharded over the batch axis
    (and the length over `context`, in its balanced order). Each local device takes its slice of the part,
    so no process needs rows or columns its devices do not hold. loss_mask becomes float32 (a weight)."""
    shape = (ts.run.train.global_batch_size, ts.run.train.seq_len)
    part = batch_part(ts.batch_sharding, shape) if part is None else part
    order = _token_order(shape[1], context_size(ts.mesh))
    out = {}
    for key in BATCH_KEYS:
        value = np.asarray(batch[key], np.float32 if key == "loss_mask" else np.int32)
        if value.shape != part.shape:
            raise ValueError(f"batch {key}: shape {list(value.shape)}, this process's part of the "
                             f"{list(shape)} batch is {list(part.shape)}")

        def device_slice(index, value=value):
            rows = np.searchsorted(part.rows, np.arange(shape[0])[index[0]])
            columns = np.searchsorted(part.columns, order[index[1]])
            return value[np.ix_(rows, columns)]

        out[key] = jax.make_array_from_callback(shape, ts.batch_sharding, device_slice)
    return out


def abstract_batch(ts: TrainSetup) -> dict:
    shape = (ts.run.train.global_batch_size, ts.run.train.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32,
                                    sharding=ts.batch_sharding) for k in BATCH_KEYS}


def _loss_sums(ts: TrainSetup):
    """loss_sums(params, batch, key, use_mntp, frozen=None) -> (sum of token losses, token count). With a
    LoRA base (`frozen`) and a key, the adapters' dropout draws from the key."""
    run = ts.run
    masking = MaskingConfig(vocab_size=run.model.vocab_size, mask_token_id=run.train.mask_token_id,
                            num_special_tokens=run.train.num_special_tokens)
    chunk = run.train.loss_chunk

    def loss_sums(params, batch, key, use_mntp, frozen=None):
        model = lora_train.merged_model(ts.graphdef, params, frozen)
        if frozen is not None and key is not None and run.lora.dropout > 0:
            set_lora_dropout_key(model, lora_train.dropout_key(key))
        ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]

        def causal():
            h, _ = model.hidden(ids, pos, seg, causal=True)
            return cross_entropy_sums(model.unembed, h, batch["targets"], batch["loss_mask"], chunk=chunk)

        def masked():
            # Spans follow the sequence: corrupt in sequence order (the same draws as without context).
            c = context_size()
            new_ids, targets, weights, _ = mask_for_mntp(key, unbalance(ids, c), unbalance(seg, c),
                                                         unbalance(batch["loss_mask"], c), masking)
            new_ids, targets, weights = (balance(x, c) for x in (new_ids, targets, weights))
            h, _ = model.hidden(new_ids, pos, seg, causal=False)
            return cross_entropy_sums(model.unembed, h, targets, weights, chunk=chunk)

        if use_mntp is None:
            return causal()
        return jax.lax.cond(use_mntp, masked, causal)

    return loss_sums


def _microbatches(batch: dict, m: int) -> dict:
    """[B, T] -> [M, B/M, T], microbatch i holding rows i, i+M, ... (see the module docstring)."""
    def split(x):
        b, t = x.shape
        return x.reshape(b // m, m, t).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_loss_and_grads(ts: TrainSetup):
    """loss_and_grads(params, batch, step_key, frozen=None) -> (loss, loss tokens, grads, mntp): what one train step
    computes before the optimizer (not jitted). loss is the mean over the batch's loss tokens, grads its
    float32 gradient; microbatches are scanned and summed before the one division (module docstring)."""
    run = ts.run
    loss_sums = _loss_sums(ts)
    m = run.train.microbatches
    mntp_p = float(run.train.mntp_probability)

    def sum_and_grads(params, batch, key, use_mntp, frozen):
        # Gradients of the loss *sum*; the count rides along as aux. float32 whatever the param dtype.
        # Only `params` is differentiated: a LoRA base (`frozen`) gets no gradient.
        (s, n), g = jax.value_and_grad(lambda p: loss_sums(p, batch, key, use_mntp, frozen), has_aux=True)(params)
        return s, n, jax.tree.map(lambda x: x.astype(jnp.float32), g)

    def loss_and_grads(params, batch, key, frozen=None):
        use_mntp = (jax.random.uniform(jax.random.fold_in(key, 0)) < mntp_p) if mntp_p > 0 else None
        if m == 1:
            loss_sum, count, grads = sum_and_grads(params, batch, jax.random.fold_in(key, 1), use_mntp, frozen)
        else:
            def body(carry, xs):
                g_acc, s_acc, n_acc = carry
                micro, i = xs
                micro = {k: constrain(v, ("batch", "length")) for k, v in micro.items()}
                s, n, g = sum_and_grads(params, micro, jax.random.fold_in(key, i + 1), use_mntp, frozen)
                return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, loss_sum, count), _ = jax.lax.scan(body, init, (_microbatches(batch, m), jnp.arange(m)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        mntp = jnp.asarray(False) if use_mntp is None else use_mntp
        return loss_sum / denom, count, grads, mntp

    return loss_and_grads


def step_key(state) -> jax.Array:
    """The key of the step `state` is about to take: fold_in(run key, step)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl="threefry2x32"), state["step"])


def make_train_step(ts: TrainSetup):
    """train_step(state, batch) -> (state, metrics), jitted, `state` donated.

    metrics: loss (mean over loss tokens), grad_norm (before clipping), learning_rate (of this
    update), loss_tokens, finite (bool: the update was applied), mntp (bool), skipped (running count)."""
    loss_and_grads = make_loss_and_grads(ts)

    def train_step(state, batch):
        params, step = state["params"], state["step"]
        loss, count, grads, mntp = loss_and_grads(params, batch, step_key(state), state.get("frozen"))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        applied = step - state["skipped"]  # updates applied so far: the schedule's (and optax's) count

        def update():
            updates, new_opt = ts.optimizer.update(grads, state["opt_state"], params)
            return optax.apply_updates(params, updates), new_opt

        # A cond, not a select per leaf: a skipped step returns the very input buffers (bit-for-bit) and
        # a normal one writes the update in place into the donated state, with no extra pass over it.
        new_params, new_opt = jax.lax.cond(finite, update, lambda: (params, state["opt_state"]))
        new_state = {"params": new_params, "opt_state": new_opt, "step": step + 1,
                     "skipped": state["skipped"] + jnp.where(finite, 0, 1).astype(jnp.int32), "rng": state["rng"]}
        if "frozen" in state:  # donated and returned as is: aliased, never copied
            new_state["frozen"] = state["frozen"]
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": ts.schedule(applied),
                   "loss_tokens": count, "finite": finite, "mntp": mntp, "skipped": new_state["skipped"]}
        return new_state, metrics

    sh = ts.state_shardings
    batch_sh = {k: ts.batch_sharding for k in BATCH_KEYS}
    return jax.jit(_under_mesh(ts, train_step), in_shardings=(sh, batch_sh), out_shardings=(sh, None),
                   donate_argnums=0)


def _under_mesh(ts: TrainSetup, fn):
    """fn traced under the run's mesh, so the model's constraints and its `context` axis apply whether or
    not the caller set the mesh (a batch in the balanced order must meet a model that knows it)."""
    def traced(*args):
        with jax.sharding.use_abstract_mesh(ts.mesh.abstract_mesh):
            return fn(*args)

    return traced


def make_eval_step(ts: TrainSetup):
    """eval_step(params, batch) -> (loss sum, token count): next-token loss, causal, no masking (LoRA:
    eval_step(params, batch, frozen), dropout off)."""
    loss_sums = _loss_sums(ts)
    batch_sh = {k: ts.batch_sharding for k in BATCH_KEYS}
    if ts.abstract_frozen is not None:
        return jax.jit(_under_mesh(ts, lambda p, b, f: loss_sums(p, b, None, None, f)),
                       in_shardings=(ts.state_shardings["params"], batch_sh, ts.state_shardings["frozen"]))
    return jax.jit(_under_mesh(ts, lambda p, b: loss_sums(p, b, None, None)),
                   in_shardings=(ts.state_shardings["params"], batch_sh))
