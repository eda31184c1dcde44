"""Validation of a training run before anything compiles: what `normistral train` and
`normistral compile-check --mode train` both run, so a "fits" verdict describes the program `train` runs.

Inside:
- `ValidationError` (a ConfigError: the CLI prints it as one line, exit 2).
- `check_run(run, mesh)`: the global batch and each microbatch against `data x fsdp`, and every parameter
  and activation dimension against its mesh axis (`jaxmodel.sharding.check_divisible`; the deliberate
  replications are listed there), and `train.seq_len` against 2 x `context` (context parallelism holds
  two equal chunks of every sequence per shard; `jaxmodel.context_parallel.check_length`); context shards
  may span hosts (each host reads only its part of each sequence: training/step.py `batch_part`). Needs no
  data and no weights.
- `check_dataset(index, run, where, tokenizer_dir=None)`: a prepared data directory's `index.json`
  against the run: its `seq_len` equals `train.seq_len`; its vocabulary and largest token id are below
  the model's `vocab_size`; its bos/eos/pad ids agree with the model config's and with the tokenizer's.
- `check_vocabulary(tokenizer_vocab, model_vocab, where)` and `check_token_ids(tokens, vocab_size,
  where)`: the checks made while data is prepared (training/data.py's `prepare_data` calls them).
- `tokenizer_special_ids(tokenizer_dir)`: bos/eos/pad ids from a Hugging Face tokenizer directory.

Why each matters: a batch the mesh does not divide is replicated (every chip computes all of it); data packed at
another length retraces the step at that length; a token id >= vocab_size reads past the embedding table,
which `jnp.take` fills with NaN (every step then "skipped"); a pad/eos id the data and the model disagree on
trains the model to end documents with a token it will never be asked to stop at.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxmodel import storage
from jaxmodel.config import ConfigError
from jaxmodel.context_parallel import check_length
from jaxmodel.model import abstract_model
from jaxmodel.sharding import check_divisible


class ValidationError(ConfigError):
    """A run that would compile another program than intended, or train on data it cannot read."""


def check_run(run, mesh) -> None:
    """The run's shapes against the mesh (see the module docstring); raises ShardingError."""
    t = run.train
    batches = [("train.global_batch_size", t.global_batch_size)]
    if t.microbatches > 1:
        batches.append((f"train.global_batch_size / train.microbatches ({t.global_batch_size} / "
                        f"{t.microbatches})", t.global_batch_size // t.microbatches))
    check_divisible(abstract_model(run.model), mesh, batches=batches)
    impl = run.model.attention_impl
    if impl == "auto" and _platform(mesh) == "tpu":
        impl = "splash"  # what attention.resolve_impl picks there
    check_length(t.seq_len, mesh, impl)


def _platform(mesh) -> str | None:
    """The platform of a concrete mesh's devices or an abstract mesh's (None when it names none)."""
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh.devices.flat[0].platform
    device = getattr(mesh, "abstract_device", None)
    return None if device is None else device.platform


def check_vocabulary(tokenizer_vocab: int, model_vocab: int | None, where: str) -> None:
    if model_vocab is not None and tokenizer_vocab > model_vocab:
        raise ValidationError(
            f"{where} a {tokenizer_vocab}-token vocabulary, but the model's vocab_size is {model_vocab}: token "
            f"ids >= {model_vocab} have no embedding; prepare the data with the model's tokenizer or set "
            f"model.vocab_size >= {tokenizer_vocab}")


def check_token_ids(tokens, vocab_size: int | None, where: str) -> int:
    """The largest id in `tokens` (-1 when empty); refuses negative ids and ids >= vocab_size."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return -1
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise ValidationError(f"{where}: token id {low} is negative")
    if vocab_size is not None and high >= vocab_size:
        raise ValidationError(
            f"{where}: token id {high} >= the model's vocab_size {vocab_size} (it would embed as NaN); prepare "
            f"the data with the model's tokenizer or set model.vocab_size > {high}")
    return high


def tokenizer_special_ids(tokenizer_dir: str) -> dict[str, int | None]:
    """{"bos_id", "eos_id", "pad_id"} of a Hugging Face tokenizer directory (pad falls back to eos, as
    prepare_data does)."""
    from transformers import AutoTokenizer

    with storage.local_copy(tokenizer_dir) as local:
        tok = AutoTokenizer.from_pretrained(local)  # never trust_remote_code
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": pad}


def _max_token_id(directory: str, index: dict) -> int:
    """The largest token id of the data: from index.json (recorded by prepare_data), else by reading the
    token shards (data prepared before the index recorded it)."""
    if isinstance(index.get("max_token_id"), int):
        return index["max_token_id"]
    high = -1
    for shard in index["shards"]:
        with storage.local_copy(storage.join(directory, shard["tokens"])) as local:
            tokens = np.load(local, mmap_mode="r")
            for start in range(0, len(tokens), 4096):
                high = max(high, int(np.max(tokens[start:start + 4096], initial=-1)))
    return high


def check_dataset(directory: str, run, role: str, *, tokenizer_dir: str | None = None) -> None:
    """A prepared data directory against the run (see the module docstring). `role` names the section
    key in messages (data.dir, data.eval_dir)."""
    index = storage.read_json(storage.join(directory, "index.json"))
    where = f"{role} {directory}"
    seq_len, model = index.get("seq_len"), run.model
    if seq_len != run.train.seq_len:
        raise ValidationError(
            f"{where}: rows were packed at seq_len {seq_len}, the run has train.seq_len={run.train.seq_len}; "
            f"set train.seq_len={seq_len} or prepare the data again with --seq-len {run.train.seq_len}")
    if isinstance(index.get("vocab_size"), int):
        check_vocabulary(index["vocab_size"], model.vocab_size, f"{where}: prepared with")
    high = _max_token_id(directory, index)
    if high >= model.vocab_size:
        check_token_ids([high], model.vocab_size, where)
    data_ids = index.get("tokenizer") or {}
    model_ids = {"bos_id": model.bos_token_id, "eos_id": model.eos_token_id, "pad_id": model.pad_token_id}
    for key, name in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        ours, theirs = model_ids[key], data_ids.get(key)
        if theirs is None or ours is None:
            continue
        ok = theirs in ours if isinstance(ours, list) else theirs == ours
        if not ok:
            raise ValidationError(
                f"{where}: the data's {key.replace('_id', '')} id is {theirs}, the model's {name} is {ours}; set "
                f"model.{name}={theirs} or prepare the data with the model's tokenizer")
    if tokenizer_dir and storage.isfile(storage.join(tokenizer_dir, "tokenizer.json")):
        tok_ids = tokenizer_special_ids(tokenizer_dir)
        for key, theirs in data_ids.items():
            if key in tok_ids and tok_ids[key] is not None and theirs is not None and tok_ids[key] != theirs:
                raise ValidationError(
                    f"{where}: the data's {key.replace('_id', '')} id is {theirs}, the tokenizer {tokenizer_dir} "
                    f"has {tok_ids[key]}; prepare the data again with that tokenizer or point data.tokenizer_dir "
                    "at the one it was prepared with")
