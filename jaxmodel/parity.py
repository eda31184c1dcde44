"""Checks against the PyTorch reference, used by the demo and the `normistral parity` command.

Inside:
- `make_hf_checkpoint(path, config, seed, dtype)`: a randomly initialized transformers
  `MistralForCausalLM` saved as a Hugging Face directory (the stand-in for the downloaded model, since
  nothing can be fetched from a hub here).
- `compare_logits(hf_dir, jax_dir, ...)` (directories or hub ids): runs transformers (eager attention,
  float32) and our model on the same random tokens at far-out positions and reports the largest
  absolute logit difference.
- `compare_layers(hf_dir, jax_dir, ...)`: the same comparison stage by stage, holding about one layer of
  each model: the embeddings, then each decoder layer of both models fed the reference's previous hidden
  states, then the final norm and the head (the logits); reports max |difference| per stage. What
  `normistral parity` runs: on the real checkpoint it needs a few GB, not two whole float32 models.
  The reference is transformers' own `MistralDecoderLayer` (eager attention) loaded with one layer's
  tensors; ours is the model's own layer module (`nnx.merge` of the stacked layers' graphdef with one
  layer's slice, exactly what `MistralForCausalLM.run_layers` scans), read slice by slice from `jax_dir`
  (`convert.tensor_reader`). Embedding and head go through `MistralForCausalLM.embed` / `unembed`.
  Memory: the embedding is read in row blocks keeping only the rows the ids use, the head and the logits
  go one vocabulary block at a time on both sides (`BLOCK_BYTES`), and each layer's tensors are copied
  into the one reference layer a tensor at a time; so host memory is the imports, about one layer of
  each model and a few blocks, whatever the depth or the vocabulary.

Both comparisons first check that the two directories describe the same network (`check_same_network`:
the architecture fields of their configs), so models that differ are named by the fields that differ,
not by the first tensor that does not fit.

torch and transformers are imported inside the functions: they are test/demo dependencies only.
"""

from __future__ import annotations

import numpy as np

from jaxmodel.config import ARCHITECTURE_FIELDS, ConfigError, MistralConfig

BLOCK_BYTES = 16 * 2**20  # compare_layers reads the embedding and head, and makes logits, in blocks of ~this


def make_hf_checkpoint(path: str, config: MistralConfig, *, seed: int = 0, dtype: str = "float32") -> None:
    import torch
    import transformers

    hf = config.to_hf()
    hf.pop("architectures"), hf.pop("model_type")
    torch.manual_seed(seed)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**hf))
    model.to(getattr(torch, dtype)).save_pretrained(path)


def hf_logits(hf_dir: str, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.MistralForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model(torch.as_tensor(input_ids), position_ids=torch.as_tensor(positions))
    return out.logits.float().numpy()


def compare_logits(
    hf_dir: str, jax_dir: str, *, batch: int = 2, length: int = 256, offset: int = 30000, seed: int = 0
) -> dict:
    """Max |logit difference| between transformers on hf_dir and our model loaded from jax_dir (float32)."""
    import jax
    from flax import nnx

    from jaxmodel.convert import from_pretrained
    from jaxmodel.hub import resolve_model

    hf_dir, jax_dir = resolve_model(hf_dir), resolve_model(jax_dir)  # hub ids -> their cached snapshots
    config = MistralConfig.from_hf(hf_dir)
    check_same_network(config, hf_dir, jax_dir)
    _check_inputs(hf_dir, config, length, offset)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, size=(batch, length))
    positions = np.broadcast_to(np.arange(length) + offset, (batch, length)).copy()
    with jax.default_matmul_precision("highest"):
        model = from_pretrained(jax_dir, progress=False)
        ours = np.asarray(nnx.jit(lambda m, i, p: m(i, positions=p))(model, ids, positions))
    reference = hf_logits(hf_dir, ids, positions)
    return {
        "max_abs_logit_diff": float(np.abs(ours - reference).max()),
        "max_abs_logit": float(np.abs(reference).max()),
        "tokens": int(batch * length),
        "position_offset": offset,
    }


def _reference_mask(length: int, window: int | None):
    """transformers' eager attention takes the mask as an additive [1, 1, T, S] tensor: causal, and within
    the sliding window (key j visible from query i when i - window < j <= i)."""
    import torch

    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def check_same_network(reference: MistralConfig, hf_dir: str, jax_dir: str) -> None:
    """A ConfigError naming every architecture field (`ARCHITECTURE_FIELDS`) whose value differs between the
    two directories' configs (`reference`: hf_dir's, already read): such models cannot be compared tensor by
    tensor."""
    from jaxmodel.convert import config_source

    ours = MistralConfig.from_hf(config_source(jax_dir))  # config.json, or a checkpoint step's saved config
    differ = [f"{name} {getattr(reference, name)} vs {getattr(ours, name)}" for name in ARCHITECTURE_FIELDS
              if getattr(reference, name) != getattr(ours, name)]
    if differ:
        raise ConfigError(f"{jax_dir} is not the same network as {hf_dir}: their configs differ in "
                          f"{', '.join(differ)}")


def _check_inputs(hf_dir: str, config: MistralConfig, length: int, offset: int) -> None:
    """Every input checked before a comparison starts: transformers' own errors on a truncated file or a
    config.json that disagrees with the weights are tracebacks, ours are one line naming the file."""
    from jaxmodel.convert import check_hf_weights

    if not 1 <= length <= config.max_position_embeddings:
        raise ConfigError(f"length {length} must lie in [1, {config.max_position_embeddings}] (the model's "
                          "context)")
    if offset < 0:
        raise ConfigError(f"offset {offset} must be non-negative")
    check_hf_weights(hf_dir, config)


def compare_layers(
    hf_dir: str, jax_dir: str, *, batch: int = 2, length: int = 256, offset: int = 30000, seed: int = 0,
    progress: bool = False, block_bytes: int = BLOCK_BYTES,
) -> dict:
    """Stage-by-stage max |difference| between transformers on hf_dir and our model read from jax_dir
    (float32; see the module docstring). Returns {"stages": [{"stage", "max_abs_diff", "end_to_end",
    "max_abs"}], "worst": the stage with the largest max_abs_diff, "max_abs_logit_diff", ...}.

    max_abs_diff: the stage of both models fed the reference's inputs (it points at the culprit);
    end_to_end: our own chain of stages (each fed our previous output) against the reference's, so the
    last one, reported as max_abs_logit_diff, is the figure `compare_logits` gives for the whole models."""
    import types

    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx
    from tqdm.auto import tqdm
    from transformers.models.mistral import modeling_mistral as hf_mistral

    from jaxmodel import storage
    from jaxmodel.convert import tensor_reader
    from jaxmodel.hub import resolve_model
    from jaxmodel.masks import AttentionMask
    from jaxmodel.model import MistralForCausalLM, RMSNorm, abstract_model, rope_cos_sin
    from jaxmodel.orbax_stream import trim_malloc
    from jaxmodel.safetensors_io import WeightFiles

    hf_dir, jax_dir = resolve_model(hf_dir), resolve_model(jax_dir)  # hub ids -> their cached snapshots
    storage.check_input_dir(hf_dir, "Hugging Face model directory")
    storage.check_input_dir(jax_dir, "model directory")
    config = MistralConfig.from_hf(hf_dir, param_dtype="float32", dtype="float32")
    check_same_network(config, hf_dir, jax_dir)
    _check_inputs(hf_dir, config, length, offset)
    ref_files = WeightFiles.open(hf_dir)
    ours = tensor_reader(jax_dir, config)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, size=(batch, length))
    positions = np.broadcast_to(np.arange(length) + offset, (batch, length)).copy()
    stages = []

    def record(stage, mine, reference, own):
        mine, reference, own = (np.asarray(x, np.float32) for x in (mine, reference, own))
        stages.append({"stage": stage, "max_abs_diff": float(np.abs(mine - reference).max()),
                       "end_to_end": float(np.abs(own - reference).max()), "max_abs": float(np.abs(reference).max())})

    def record_blocks(stage, blocks):
        """record() over blocks of one stage's outputs (mine, reference, own): the max of each figure."""
        diff = e2e = top = 0.0
        for mine, reference, own in blocks:
            mine, reference, own = (np.asarray(x, np.float32) for x in (mine, reference, own))
            diff = max(diff, float(np.abs(mine - reference).max()))
            e2e = max(e2e, float(np.abs(own - reference).max()))
            top = max(top, float(np.abs(reference).max()))
        stages.append({"stage": stage, "max_abs_diff": diff, "end_to_end": e2e, "max_abs": top})

    def ref_tensor(name):
        return torch.from_numpy(ref_files.get(name).astype(np.float32, copy=False))

    # Embedding rows and head columns are read in blocks of ~block_bytes (the real vocabulary's tables are
    # 0.5 GB each in bfloat16, 1 GB in float32): only the rows the ids name are kept.
    d, vocab = config.hidden_size, config.vocab_size
    step = max(1, block_bytes // (4 * max(d, batch * length)))
    blocks = [(a, min(a + step, vocab)) for a in range(0, vocab, step)]
    with torch.no_grad(), jax.default_matmul_precision("highest"):
        # Embeddings: each side's rows for the ids present, gathered block by block into a small table
        # that the model's own embed() indexes with the ids renumbered.
        used, renumbered = np.unique(ids, return_inverse=True)
        renumbered = renumbered.reshape(ids.shape)
        ref_rows, our_rows = np.empty((len(used), d), np.float32), np.empty((len(used), d), np.float32)
        for a, b in blocks:
            inside = (used >= a) & (used < b)
            if inside.any():
                ref_rows[inside] = ref_files.get_slice("model.embed_tokens.weight", (slice(a, b),))[used[inside] - a]
                our_rows[inside] = ours(("embed_tokens",), None, ((a, b), (0, d)))[used[inside] - a]
        hidden = torch.from_numpy(ref_rows[renumbered])
        # The model's own methods on a stand-in `self` holding just the tensor they read.
        embed = jax.jit(lambda w, i: MistralForCausalLM.embed(types.SimpleNamespace(embed_tokens=w, config=config), i))
        own = embed(jnp.asarray(our_rows), renumbered)  # our own chain, for the end-to-end figure
        record("embeddings", own, hidden.numpy(), own)
        del ref_rows, our_rows

        # Decoder layers: the reference's layer i and ours, both fed the reference's hidden states.
        hf_config = transformers.MistralConfig.from_pretrained(hf_dir)
        hf_config._attn_implementation = "eager"
        rotary = hf_mistral.MistralRotaryEmbedding(hf_config)
        position_ids = torch.as_tensor(positions)
        ref_rope = rotary(hidden, position_ids)
        ref_mask = _reference_mask(length, config.sliding_window)
        ref_layer = hf_mistral.MistralDecoderLayer(hf_config, layer_idx=0).eval()
        ref_params = dict(ref_layer.named_parameters())
        layers_def, layers_state = nnx.split(abstract_model(config).layers)
        flat = nnx.to_flat_state(layers_state)
        cos, sin = rope_cos_sin(jnp.asarray(positions), config.head_dim, config.rope_theta, jnp.float32)
        mask = AttentionMask.for_sequence(jnp.ones((batch, length), jnp.int32), causal=True,
                                          window=config.sliding_window)

        @jax.jit
        def our_layer(state, h):
            out, _ = nnx.merge(layers_def, state)(h, cos, sin, mask, config.attention_impl)  # (hidden, kv)
            return out

        for i in tqdm(range(config.num_hidden_layers), desc="comparing layers", unit="layer", disable=not progress):
            for n, param in ref_params.items():  # one tensor at a time into the one reference layer
                param.copy_(ref_tensor(f"model.layers.{i}.{n}"))
            state = nnx.from_flat_state([(path, var.replace(jnp.asarray(ours(("layers", *map(str, path)), i))))
                                         for path, var in flat])
            mine = our_layer(state, jnp.asarray(hidden.numpy()))
            own = our_layer(state, own)
            out = ref_layer(hidden, attention_mask=ref_mask, position_ids=position_ids, position_embeddings=ref_rope)
            out = out[0] if isinstance(out, tuple) else out
            record(f"layer {i}", mine, out.numpy(), own)
            hidden = out
            del state, mine
            trim_malloc()  # freed layer buffers back to the OS, not left in the arenas of XLA's threads
        del ref_layer, ref_params

        # Final norm and head, on the reference's last hidden states; the logits one vocabulary block at a
        # time on both sides (never [B, T, V] whole).
        ref_norm = hf_mistral.MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        ref_norm.load_state_dict({"weight": ref_tensor("model.norm.weight")})
        normed = ref_norm(hidden)
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=jnp.float32, rngs=nnx.Rngs(0))
        norm.weight = nnx.Param(jnp.asarray(ours(("norm", "weight"), None), jnp.float32))
        apply_norm = jax.jit(lambda n, h: n(h))
        own = apply_norm(norm, own)
        record("final norm", apply_norm(norm, jnp.asarray(hidden.numpy())), normed.numpy(), own)
        tied = config.tie_word_embeddings
        head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        key = "embed_tokens" if tied else "lm_head"
        unembed = jax.jit(lambda w, h: MistralForCausalLM.unembed(types.SimpleNamespace(**{key: w}, config=config), h))
        normed_ours = jnp.asarray(normed.numpy())

        def head_blocks():
            for a, b in blocks:
                ref_w = torch.from_numpy(ref_files.get_slice(head_name, (slice(a, b),)).astype(np.float32, copy=False))
                head = jnp.asarray(ours((key,), None, ((a, b), (0, d)) if tied else ((0, d), (a, b))))
                yield unembed(head, normed_ours), (normed @ ref_w.T).numpy(), unembed(head, own)

        record_blocks("logits", head_blocks())
    worst = max(stages, key=lambda r: r["max_abs_diff"])
    return {"stages": stages, "worst": worst, "max_abs_logit_diff": stages[-1]["end_to_end"],
            "max_abs_logit": stages[-1]["max_abs"], "tokens": int(batch * length), "position_offset": offset}
