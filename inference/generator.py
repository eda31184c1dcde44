"""`Generator`: text in, text out, on the continuous-batching engine (model card usage, batched).

Inside: `Generator(model, tokenizer, *, slots, max_model_len, kv_cache_dtype, page_size, kv_cache_memory,
prefix_caching, warmup)`, `Generator.from_pretrained(path or hub id, *, tokenizer, dtype, mesh, quantize,
group_size, lora, ...)`, `.generate(prompts, *, max_new_tokens, stop, template, ...) -> list[str]`,
`.iter_records(records, ...)` (the CLI's `generate --input`), `.warmup()`, `.requests` / `.engine_for` (the
pieces), `.stop_ids(stop)` (the card's token sets), `.encode`, `.check_lengths`, `.generate_ids`,
`read_jsonl(path)` (the CLI's input file) and `load_tokenizer(path)`.

Following the model card (norallm/normistral-11b-long):
- prompts are tokenized with the tokenizer's defaults (its `<s>` included), one prompt per row;
- `stop`: None (the tokenizer's EOS), a string (a stop string, checked on the incrementally decoded text
  as vLLM does, and cut before it: `stop="\n"` ends at the first newline, which is where the card's set
  of every newline token `[i for i in range(tok.vocab_size) if "\n" in tok.decode([i])]` ends it), a
  token id, or a sequence of those. EOS always ends a completion;
- the completion is `tokenizer.decode(new_tokens, skip_special_tokens=True).strip()` (no `</s>` ever).
All prompts of a call go to one `inference.engine.Engine` (up to `slots` sequences run at once, a
finished one replaced by the next prompt at once); results come back in input order. The engine (its
pool of KV cache pages; sequences of up to `max_model_len` tokens, by default the model's context) is
built and every program it runs compiled at load by `from_pretrained` (`warmup()`, with a progress line on
stderr; the constructor does it with warmup=True, else the first generating call), so no call compiles:
the first one over a batch of prompts runs as fast as the next. Only a call asking for another
`batch_size` than `slots` builds (and compiles) another engine. With JAX's persistent compilation cache on
(jaxmodel/compile_cache.py, the CLI's default), a second process finds the programs there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inference.engine import Engine, Request
from inference.generate import GenerateError
from inference.quantize import DEFAULT_GROUP_SIZE, MODES, load_transform, quantize_model
from jaxmodel.checks import check_template, json_problem
from jaxmodel.compile_cache import CompileCount
from jaxmodel.model import unstack_layers


class Generator:
    def __init__(self, model: nnx.Module, tokenizer, *, kv_cache_dtype: str | None = None, slots: int = 8,
                 max_model_len: int | None = None, prefill_chunk: int = 256, page_size: int = 16,
                 kv_cache_memory: int | float | None = None, num_pages: int | None = None,
                 prefix_caching: bool = True, warmup: bool = False):
        """slots: sequences the engine runs at once; max_model_len: the longest prompt + completion (default:
        the model's context); page_size, kv_cache_memory / num_pages (the pool; default: pages for `slots`
        sequences of max_model_len, at most 0.9 of the free memory), prefix_caching: the engine's. warmup:
        build the engine and compile its programs now; else at the first generating call or `warmup()` (a
        Generator made around a model only to score, as the lm-eval adapter's, then never holds a pool)."""
        self.model = model
        self.parts = nnx.split(model)
        self.config = model.config
        self.tokenizer = tokenizer
        self.kv_cache_dtype = kv_cache_dtype
        self.slots, self.max_model_len, self.prefill_chunk = slots, max_model_len, prefill_chunk
        self.pool = {"page_size": page_size, "kv_cache_memory": kv_cache_memory, "num_pages": num_pages,
                     "prefix_caching": prefix_caching}
        self.engine: Engine | None = None
        self._warm: Engine | None = None  # the engine whose programs are compiled
        self._stop_sets: dict = {}
        if warmup:
            self.warmup()

    @classmethod
    def from_pretrained(cls, path: str, *, tokenizer=None, dtype=jnp.bfloat16, mesh=None, quantize: str | None = None,
                        group_size: int = DEFAULT_GROUP_SIZE, kv_cache_dtype: str | None = None,
                        progress: bool = False, revision: str | None = None, slots: int = 8,
                        max_model_len: int | None = None, prefill_chunk: int = 256, page_size: int = 16,
                        kv_cache_memory: int | float | None = None, num_pages: int | None = None,
                        prefix_caching: bool = True, warmup: bool = True, lora: str | None = None,
                        **options) -> Generator:
        """Loads a Hugging Face directory or model id (`org/name[@revision]`, fetched into the hub cache),
        or a `normistral import-hf` directory, and its tokenizer; then builds the engine and compiles its
        programs (`warmup`; the engine's options as the constructor's).

        quantize="int8" | "int4" (see quantize.py; group_size for int4): each tensor of a Hugging Face
        directory is quantized on the host as it is read and only the integer arrays are placed on the
        accelerator / mesh (host memory: about one 16-bit layer slice beyond the baseline). An import-hf
        (Orbax) directory is restored into host memory, quantized there, then placed. On CPU the layer
        stack is then split into one module per layer (`jaxmodel.model.unstack_layers`).

        lora: a PEFT adapter directory (local, gs:// or hub id), checked against config.json before the
        weights load, then merged into them (`load_peft_adapter` + `merge_lora`) before any quantization:
        with `quantize` the model loads unquantized (host memory when on an accelerator), is merged, then
        quantized, so the quantized model holds the merged weights."""
        from jaxmodel import storage
        from jaxmodel.config import MistralConfig
        from jaxmodel.convert import PARAMS_DIR, config_source, from_pretrained, resolve_lora
        from jaxmodel.hub import resolve_model
        from jaxmodel.lora import LoraError, error_line
        from jaxmodel.sharding import make_mesh

        if quantize is not None and quantize not in MODES:
            raise GenerateError(f"quantize={quantize!r} is not one of {MODES}")
        path = resolve_model(path, revision=revision, allow_pickle=options.get("allow_pickle", False))
        if not storage.isdir(path):  # a local directory or a gs:// URL
            storage.check_bucket(path)
            raise GenerateError(f"{path}: model directory not found")
        storage.require_committed(path, "model directory")
        config = MistralConfig.from_hf(config_source(path))  # a broken config.json: named as such, not as the tokenizer
        if lora is not None:  # before the weights: a wrong adapter fails in seconds
            try:
                lora = resolve_lora(lora, config)
            except LoraError as e:
                raise GenerateError(error_line(e, "lora=", lora)) from None
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
        if quantize is None:
            model = _merged(from_pretrained(path, dtype=dtype, mesh=mesh, progress=progress, **options), lora)
        elif lora is None and not storage.isdir(storage.join(path, PARAMS_DIR)):
            model = from_pretrained(path, dtype=dtype, mesh=mesh, progress=progress,
                                    transform=load_transform(quantize, group_size), **options)
        else:
            host = _host_device()
            on_host = host is not None and jax.devices()[0].platform != "cpu"
            load_mesh = make_mesh((1, 1, 1), devices=[host]) if on_host else mesh
            model = _merged(from_pretrained(path, dtype=dtype, mesh=load_mesh, progress=progress, **options), lora)
            quantize_model(model, quantize, mesh=mesh, place=on_host, group_size=group_size)
        if jax.tree.leaves(nnx.state(model))[0].devices().pop().platform == "cpu":
            unstack_layers(model)  # XLA CPU would copy every layer's weights out of the stack per call
        return cls(model, tokenizer, kv_cache_dtype=kv_cache_dtype, slots=slots, max_model_len=max_model_len,
                   prefill_chunk=prefill_chunk, page_size=page_size, kv_cache_memory=kv_cache_memory,
                   num_pages=num_pages, prefix_caching=prefix_caching, warmup=warmup)

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

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def engine_for(self, slots: int | None = None) -> Engine:
        """The engine, (re)built when absent or of another sequence count; its programs compiled (`warmup`)."""
        slots = slots or self.slots
        if self.engine is None or self.engine.slots != slots:
            self.engine = self._warm = None  # free the old pool first
            self.engine = Engine(self.parts, slots=slots, max_model_len=self.max_model_len, decode=self.decode,
                                 kv_cache_dtype=self.kv_cache_dtype, prefill_chunk=self.prefill_chunk, **self.pool)
        if self._warm is not self.engine:
            self._compile(self.engine)
        return self.engine

    def warmup(self) -> Engine:
        """Builds the engine for `slots` sequences (if not built) and compiles every program it runs, now."""
        return self.engine_for(self.slots)

    def _compile(self, engine: Engine) -> None:
        """engine.warmup() between two progress lines on stderr (on the 11B model a program takes minutes)."""
        t, count = time.time(), CompileCount()
        print(f"generator: compiling the engine's programs ({engine.slots} sequences of up to "
              f"{engine.max_model_len} tokens, {engine.num_pages} KV cache pages of {engine.page_size}) ...",
              file=sys.stderr, flush=True)
        programs = engine.warmup(prompt_logprobs=False)  # a Generator never asks for prompt logprobs
        print(f"generator: {programs} programs ready in {time.time() - t:.1f} s ({count.summary()})",
              file=sys.stderr, flush=True)
        self._warm = engine

    def split_stop(self, stop) -> tuple[frozenset, tuple]:
        """`stop` -> (token ids, stop strings); EOS is always a stop token."""
        ids, strings = set(), []
        items = [] if stop is None else [stop] if isinstance(stop, (str, int, np.integer)) else list(stop)
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise GenerateError("an empty stop string")
                strings.append(item)
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                if not 0 <= int(item) < self.config.vocab_size:
                    raise GenerateError(f"stop token id {int(item)} is out of range [0, {self.config.vocab_size})")
                ids.add(int(item))
            else:
                raise GenerateError(f"stop items must be strings or token ids, got {item!r}")
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids), tuple(strings)

    def requests(self, token_lists: Sequence[Sequence[int]], *, max_new_tokens: int = 64, stop=None,
                 stop_ids: Iterable[int] = (), do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0) -> list[Request]:
        """Engine requests for token lists (row i samples from stream i of `seed`)."""
        ids, strings = self.split_stop(stop)
        ids = ids | frozenset(int(t) for t in stop_ids)
        temp = float(temperature) if do_sample else 0.0
        if do_sample and temp <= 0:
            raise GenerateError(f"temperature must be > 0 when sampling, got {temperature}")
        return [Request(list(t), max_tokens=max_new_tokens, stop_ids=ids, stop_strings=strings, temperature=temp,
                        top_k=int(top_k), top_p=float(top_p), seed=int(seed), stream_id=i)
                for i, t in enumerate(token_lists)]

    def encode(self, prompts: Sequence[str], template: str | None = None) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if template is not None:
            check_template(template)
        texts = [template.format(p) if template else p for p in prompts]
        return [list(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def check_lengths(self, token_lists: Sequence[Sequence[int]], max_new_tokens: int, names=None) -> None:
        """Refuses (GenerateError) an empty prompt or one that leaves no room for max_new_tokens."""
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise GenerateError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        context = self.max_model_len or self.config.max_position_embeddings
        for b, ids in enumerate(token_lists):
            name = names[b] if names else f"prompt {b}"
            if not ids:
                raise GenerateError(f"{name} is empty")
            if len(ids) + max_new_tokens > context:
                raise GenerateError(f"{name} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                                    f"exceeds the model's context of {context} tokens")

    def _run(self, token_lists, batch_size, **kwargs) -> Iterator[Request]:
        """Requests through the engine, yielded in input order as soon as each (and those before it) is done."""
        reqs = self.requests(token_lists, **kwargs)
        engine = self.engine_for(batch_size)
        for r in reqs:
            engine.submit(r, block=True)
        try:
            for r in reqs:
                while not r.finished:
                    engine.step()
                yield r
        finally:  # abandoned midway (an error, a consumer that stopped): free the slots
            for r in reqs:
                if not r.finished:
                    engine.cancel(r)
            if any(not r.finished for r in reqs):
                engine.step()

    def generate_ids(self, token_lists: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     stop_ids: Iterable[int] = (), batch_size: int | None = None, **sampling) -> list[list[int]]:
        """New token ids per prompt, ending with the stop token if one was produced."""
        if not token_lists:
            raise GenerateError("no prompts given")
        self.check_lengths(token_lists, max_new_tokens)
        return [r.tokens for r in self._run(token_lists, batch_size, max_new_tokens=max_new_tokens,
                                            stop_ids=stop_ids, **sampling)]

    def generate(self, prompts: Sequence[str] | str, *, max_new_tokens: int = 64, stop=None,
                 template: str | None = None, batch_size: int | None = None, **sampling) -> list[str]:
        """Completions (decoded without special tokens, stripped) for `prompts`, each formatted with
        `template` if given (e.g. "Engelsk: {0}\nBokmål:"), in input order. batch_size: the engine's
        decode slots (default: the Generator's). sampling: do_sample, temperature, top_k, top_p, seed."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise GenerateError("no prompts given")
        encoded = self.encode(prompts, template)
        self.check_lengths(encoded, max_new_tokens)
        return [r.text.strip() for r in self._run(encoded, batch_size, max_new_tokens=max_new_tokens, stop=stop,
                                                  **sampling)]

    def iter_records(self, records: Sequence[dict], *, max_new_tokens: int = 64, stop=None,
                     template: str | None = None, batch_size: int = 8, names: Sequence[str] | None = None,
                     **sampling) -> Iterator[list[dict]]:
        """Completes prompt records ({"text": ..., other fields kept}) through the engine (batch_size
        decode slots); yields them in input order, in groups of batch_size, each with an "output" field
        as soon as the group is done. Every prompt is checked before any work."""
        if not records:
            raise GenerateError("no prompts given")
        for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise GenerateError(f"{name} must be a positive integer, got {value!r}")
        names = names or [f"prompt {i + 1}" for i in range(len(records))]
        encoded = self.encode([r["text"] for r in records], template)
        self.check_lengths(encoded, max_new_tokens, names)
        self.split_stop(stop)

        def batches():  # the checks above run now, at the call, not at the first batch
            done = self._run(encoded, batch_size, max_new_tokens=max_new_tokens, stop=stop, **sampling)
            group = []
            for record, r in zip(records, done):
                group.append({**record, "output": r.text.strip()})
                if len(group) == batch_size:
                    yield group
                    group = []
            if group:
                yield group

        return batches()


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL prompt file; each must be an object with a string field "text"."""
    import json

    from jaxmodel import storage

    storage.check_input_file(path, "JSON-lines file of prompts")
    records = []
    with storage.open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is named with its line
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise GenerateError(f"{path}:{number}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:  # json_problem gives "1: not valid JSON (...)": use our line
                raise GenerateError(f"{path}:{number}:{json_problem(e).partition(':')[2]}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise GenerateError(f'{path}:{number}: expected an object with a string field "text"')
            records.append(record)
    if not records:
        raise GenerateError(f"{path}: no prompts in the file")
    return records


def load_tokenizer(path: str):
    """A plain Hugging Face tokenizer from a directory, local or gs:// (never trust_remote_code), or a
    GenerateError."""
    import transformers

    from jaxmodel import storage
    from jaxmodel.convert import TOKENIZER_FILES

    storage.check_input_dir(path, "tokenizer directory")
    if not any(storage.isfile(storage.join(path, name)) for name in ("tokenizer.json", "tokenizer.model")):
        raise GenerateError(f"{path}: no tokenizer there (neither tokenizer.json nor tokenizer.model)")
    try:
        with storage.local_copy(path, names=(*TOKENIZER_FILES, "config.json")) as local:
            return transformers.AutoTokenizer.from_pretrained(local)
    except Exception as e:  # noqa: BLE001 (transformers raises OSError, ValueError, TypeError, KeyError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GenerateError(f"{path}: no usable tokenizer there ({first[:200]})") from None


def _merged(model, lora: str | None):
    """The model with the PEFT adapter at `lora` (already checked) folded into its weights, in place."""
    if lora is not None:
        from jaxmodel.lora import load_peft_adapter, merge_lora

        load_peft_adapter(model, lora)
        merge_lora(model)
    return model


def _host_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return None
