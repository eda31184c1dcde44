"""`Generator`: text in, text out, around `inference.generate` (model card usage, batched).

Inside: `Generator(model, tokenizer)`, `Generator.from_pretrained(path or hub id, *, tokenizer, dtype, mesh,
quantize)`, `.generate(prompts, *, max_new_tokens, stop, template, batch_size, ...) -> list[str]`, `.stop_ids(stop)`,
`.encode`, `.check_lengths`, `.generate_ids` (the steps `generate` is made of, for the CLI), and
`read_jsonl(path)` (the CLI's input file).

Following the model card (norallm/normistral-11b-long):
- prompts are tokenized with the tokenizer's defaults (its `<s>` included), one prompt per row;
- `stop="\\n"` stops at any token whose decoded text contains a newline, the set the card builds as
  `[i for i in range(tok.vocab_size) if "\\n" in tok.decode([i])]`; any other string works the same way,
  and each set is computed once per Generator (a pass over the vocabulary) and cached;
- the completion is `tokenizer.decode(new_tokens).strip()`, the stop token included in what is decoded
  (then stripped, as the card does) and the padding after it excluded.
The model is split into (graphdef, state) once; every call reuses the jitted step for its bucket.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inference.generate import GenerateError, generate
from inference.quantize import DEFAULT_GROUP_SIZE, MODES, load_transform, quantize_model


class Generator:
    def __init__(self, model: nnx.Module, tokenizer, *, kv_cache_dtype: str | None = None):
        self.model = model
        self.parts = nnx.split(model)
        self.config = model.config
        self.tokenizer = tokenizer
        self.kv_cache_dtype = kv_cache_dtype
        self._stop_sets: dict = {}

    @classmethod
    def from_pretrained(cls, path: str, *, tokenizer=None, dtype=jnp.bfloat16, mesh=None, quantize: str | None = None,
                        group_size: int = DEFAULT_GROUP_SIZE, kv_cache_dtype: str | None = None,
                        progress: bool = False, revision: str | None = None, **options) -> Generator:
        """Loads a Hugging Face directory or model id (`org/name[@revision]`, fetched into the hub cache),
        or a `normistral import-hf` directory, and its tokenizer.

        quantize="int8" | "int4" (see quantize.py; group_size for int4): each tensor of a Hugging Face
        directory is quantized on the host as it is read and only the integer arrays are placed on the
        accelerator / mesh (host memory: about one 16-bit layer slice beyond the baseline). An import-hf
        (Orbax) directory is restored into host memory, quantized there, then placed."""
        from jaxmodel.convert import PARAMS_DIR, from_pretrained
        from jaxmodel.hub import resolve_model
        from jaxmodel.sharding import make_mesh

        if quantize is not None and quantize not in MODES:
            raise GenerateError(f"quantize={quantize!r} is not one of {MODES}")
        path = resolve_model(path, revision=revision, allow_pickle=options.get("allow_pickle", False))
        if not os.path.isdir(path):
            raise GenerateError(f"{path}: model directory not found")
        if tokenizer is None:
            import transformers

            try:  # never trust_remote_code: the tokenizer must be a plain tokenizer.json / config
                tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError) as e:
                raise GenerateError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
        if quantize is None:
            model = from_pretrained(path, dtype=dtype, mesh=mesh, progress=progress, **options)
        elif not os.path.isdir(os.path.join(path, PARAMS_DIR)):
            model = from_pretrained(path, dtype=dtype, mesh=mesh, progress=progress,
                                    transform=load_transform(quantize, group_size), **options)
        else:
            host = _host_device()
            on_host = host is not None and jax.devices()[0].platform != "cpu"
            load_mesh = make_mesh((1, 1, 1), devices=[host]) if on_host else mesh
            model = from_pretrained(path, dtype=dtype, mesh=load_mesh, progress=progress, **options)
            quantize_model(model, quantize, mesh=mesh, place=on_host, group_size=group_size)
        return cls(model, tokenizer, kv_cache_dtype=kv_cache_dtype)

    # -- stop tokens ------------------------------------------------------------------------------------

    def stop_ids(self, stop) -> list[int]:
        """Token ids for `stop`: None (the tokenizer's EOS), a string (every token whose text contains
        it, as the card builds its newline set), an int, or a sequence of those."""
        if stop is None:
            eos = self.tokenizer.eos_token_id
            return [] if eos is None else [int(eos)]
        if isinstance(stop, (int, np.integer)):
            return [int(stop)]
        if isinstance(stop, str):
            if stop not in self._stop_sets:
                tok = self.tokenizer
                self._stop_sets[stop] = [i for i in range(tok.vocab_size) if stop in tok.decode([i])]
            return list(self._stop_sets[stop])
        ids: list[int] = []
        for item in stop:
            ids += self.stop_ids(item)
        return sorted(set(ids))

    # -- generation ---------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str], template: str | None = None) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [template.format(p) if template else p for p in prompts]
        return [list(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def check_lengths(self, token_lists: Sequence[Sequence[int]], max_new_tokens: int, names=None) -> None:
        """Refuses (GenerateError) an empty prompt or one that leaves no room for max_new_tokens."""
        context = self.config.max_position_embeddings
        for b, ids in enumerate(token_lists):
            name = names[b] if names else f"prompt {b}"
            if not ids:
                raise GenerateError(f"{name} is empty")
            if len(ids) + max_new_tokens > context:
                raise GenerateError(f"{name} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                                    f"exceeds the model's context of {context} tokens")

    def generate_ids(self, token_lists: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     stop_ids: Iterable[int] = (), **sampling) -> list[list[int]]:
        """New token ids per prompt, cut after the stop token (no padding)."""
        if not token_lists:
            raise GenerateError("no prompts given")
        length = max(len(t) for t in token_lists)
        ids = np.zeros((len(token_lists), max(length, 1)), np.int64)
        mask = np.zeros_like(ids)
        for b, t in enumerate(token_lists):
            ids[b, length - len(t):] = t
            mask[b, length - len(t):] = 1
        stop_ids = list(stop_ids)
        pad = self.tokenizer.pad_token_id
        out = generate(self.parts, ids, mask, max_new_tokens=max_new_tokens, eos_token_ids=stop_ids,
                       pad_token_id=pad, kv_cache_dtype=self.kv_cache_dtype, **sampling)
        stops = set(stop_ids)
        result = []
        for row in out.tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            result.append(row[:end])
        return result

    def generate(self, prompts: Sequence[str] | str, *, max_new_tokens: int = 64, stop=None,
                 template: str | None = None, batch_size: int | None = None, **sampling) -> list[str]:
        """Completions (decoded, stripped) for `prompts`, each formatted with `template` if given
        (e.g. "Engelsk: {0}\\nBokmål:"). batch_size: prompts per generation call (default: all)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise GenerateError("no prompts given")
        stop_ids = self.stop_ids(stop)
        size = batch_size or len(prompts)
        texts = []
        for start in range(0, len(prompts), size):
            encoded = self.encode(prompts[start:start + size], template)
            self.check_lengths(encoded, max_new_tokens, [f"prompt {start + b}" for b in range(len(encoded))])
            for new in self.generate_ids(encoded, max_new_tokens=max_new_tokens, stop_ids=stop_ids, **sampling):
                texts.append(self.tokenizer.decode(new).strip())
        return texts


    def iter_records(self, records: Sequence[dict], *, max_new_tokens: int = 64, stop=None,
                     template: str | None = None, batch_size: int = 8, names: Sequence[str] | None = None,
                     **sampling) -> Iterator[list[dict]]:
        """Completes prompt records ({"text": ..., other fields kept}) batch by batch, in input order;
        yields each batch's records with an "output" field. Every prompt is checked before any work."""
        if not records:
            raise GenerateError("no prompts given")
        if batch_size < 1 or max_new_tokens < 1:
            raise GenerateError("batch_size and max_new_tokens must be positive")
        names = names or [f"prompt {i + 1}" for i in range(len(records))]
        encoded = self.encode([r["text"] for r in records], template)
        self.check_lengths(encoded, max_new_tokens, names)
        stop_ids = self.stop_ids(stop)

        def batches():  # the checks above run now, at the call, not at the first batch
            for start in range(0, len(records), batch_size):
                new = self.generate_ids(encoded[start:start + batch_size], max_new_tokens=max_new_tokens,
                                        stop_ids=stop_ids, **sampling)
                yield [{**record, "output": self.tokenizer.decode(ids).strip()}
                       for record, ids in zip(records[start:start + batch_size], new)]

        return batches()


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL prompt file; each must be an object with a string field "text"."""
    import json

    if not os.path.isfile(path):
        raise GenerateError(f"{path}: input file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerateError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise GenerateError(f'{path}:{number}: expected an object with a string field "text"')
            records.append(record)
    if not records:
        raise GenerateError(f"{path}: no prompts in the file")
    return records


def _host_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return None
