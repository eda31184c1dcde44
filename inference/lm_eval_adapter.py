"""The JAX model as an lm-evaluation-harness model (`lm_eval`, pinned 0.4.13): NorEval and any lm-eval task.

Inside: `NorMistralLM` (registered with lm-eval as `normistral`), `load_tokenizer`, and `main()`
(`python -m inference.lm_eval_adapter ...`: lm-eval's own command line with this model registered; a
user's mistake there is one line `normistral: error: ...` and exit status 2, too).

Errors name what the user typed: `max_length=4` through lm-eval's `--model_args`, `--max-length 4` through
`normistral eval` (which constructs the model with `cli=True`).

Registration: lm-eval 0.4.13 finds models only in its registry (it has no entry-point discovery for
models), so importing this module registers `normistral` (`@register_model`). Then
`lm_eval.simple_evaluate(model="normistral", model_args="pretrained=DIR,dtype=float32")` works, and so
does lm-eval's command line run through this module:
    python -m inference.lm_eval_adapter run --model normistral --model_args pretrained=DIR --tasks norquad
(`normistral eval` is the shorter way; checking and running tasks: inference/eval_tasks.py). An instance
works too: `simple_evaluate(model=NorMistralLM(...))`.

Request types, each computed so that the numbers equal lm-eval's `hf` model (HFLM) on the same weights:
- `loglikelihood`: lm-eval's TemplateLM tokenizes (context, continuation) pairs (trailing spaces of the
  context move to the continuation); `_loglikelihood_tokens` hands them to `inference.scoring.Scorer`:
  packed rows with segment ids, one jitted function per shape bucket, greedy flags on device, contexts
  truncated from the left at `max_length` exactly as HFLM truncates them.
- `loglikelihood_rolling`: HFLM's windows (`lm_eval.utils.get_rolling_token_windows` with context_len 1,
  then `make_disjoint_window`), all windows of all documents scored together, summed per document.
- `generate_until`: `inference.Generator` (greedy unless the task samples). Contexts are encoded as
  HFLM's batch encoder does and left-truncated to `max_length - max_gen_toks` tokens; the generator stops
  a row at the first token whose text contains an `until` string or EOS (lm-eval adds EOS to `until`),
  or after `max_gen_toks` tokens; the text is decoded without special tokens and cut before the first
  `until` string (lm-eval's `postprocess_generated_text`), as HFLM does. A stop string split across
  tokens does not stop the row early; the cut at the text still gives HFLM's answer.

Model arguments (`--model_args key=value,...`): pretrained (a Hugging Face or import-hf directory, a
training checkpoint step WORKDIR/checkpoints/STEP, or a hub id org/name[@revision]; passed to
`jaxmodel.from_pretrained`), tokenizer (default: pretrained's own; for a checkpoint step, the run's
tokenizer; never one with more tokens than the model's vocab_size), dtype (bfloat16),
quantize (int8 or int4), group_size (int4: inputs per scale, 128), lora (a PEFT adapter directory or hub id,
checked against the model's config.json first, merged into the weights before quantizing), batch_size (rows
of packed requests per call, and prompts per generation call),
max_length (default: the config's max_position_embeddings, as HFLM), mesh (DATAxFSDPxTENSOR, e.g. 1x-1x1;
commas separate model_args), min_row (shortest packed row), max_gen_toks (256), add_bos_token,
prefix_token_id.

Several processes (multi-host TPU slices, `jax.distributed`): every process runs the same harness on
the same requests in the same order (lm-eval's request building is deterministic), so every process
joins each jitted call over the global mesh; the model reports rank 0 / world size 1 to lm-eval so that
the harness does not split the requests itself. Process 0 is the one that prints and writes
(`normistral eval`).
"""

from __future__ import annotations

import json
import os
import sys

import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models before we add ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from inference.eval_tasks import EvalError, arg_text
from inference.scoring import MIN_ROW, ScoreError, Scorer, ScoreRequest

# -- model loading ------------------------------------------------------------------------------------


def _step_dir_tokenizer(path: str) -> list[str]:
    """For a training checkpoint step (params/ and meta/, no tokenizer of its own), the tokenizers the run
    used: model.init_from's directory, then WORKDIR/<data.tokenizer_dir>."""
    from jaxmodel import storage

    meta_path = storage.join(path, "meta", "metadata")
    if not storage.isfile(meta_path):
        return []
    meta = storage.read_json(meta_path)
    out = []
    if meta.get("init_from"):
        out.append(meta["init_from"])
    tok_dir = (meta.get("data") or {}).get("tokenizer_dir")
    ckpt_dir = (meta.get("checkpoint") or {}).get("dir") or "checkpoints"
    if tok_dir:
        if os.path.isabs(tok_dir) or storage.is_remote(tok_dir):
            out.append(tok_dir)
        else:
            workdir = storage.parent(path)  # WORKDIR/<checkpoint.dir>/STEP -> WORKDIR
            if not (os.path.isabs(ckpt_dir) or storage.is_remote(ckpt_dir)):
                for _ in ckpt_dir.strip("/").split("/"):
                    workdir = storage.parent(workdir)
            out.append(storage.join(workdir, tok_dir))
    return out


def load_tokenizer(tokenizer: str | None, pretrained: str | None, *, flag: str = "tokenizer="):
    """A transformers tokenizer from `tokenizer`, else `pretrained`, else (a checkpoint step) its run's.
    Never trust_remote_code. flag: how the error's hint spells the tokenizer argument."""
    import transformers

    from jaxmodel import storage

    candidates = [tokenizer] if tokenizer else [pretrained, *_step_dir_tokenizer(pretrained)]
    for path in candidates:
        if not path or not storage.isfile(storage.join(path, "tokenizer.json")) and not storage.isfile(
                storage.join(path, "tokenizer_config.json")):
            continue
        with storage.local_copy(path) as local:
            try:
                return transformers.AutoTokenizer.from_pretrained(local)
            except (OSError, ValueError) as e:
                raise EvalError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    raise EvalError(f"{tokenizer or pretrained}: no tokenizer found (tokenizer.json); pass {flag}DIR")


def _mesh(spec):
    if spec is None or spec == "":
        return None
    from jaxmodel.sharding import make_mesh

    if isinstance(spec, str):
        try:
            sizes = tuple(int(x) for x in spec.replace(",", "x").split("x"))
        except ValueError:
            sizes = ()
        if len(sizes) != 3:
            raise EvalError(f"mesh={spec!r}: expected DATAxFSDPxTENSOR sizes, e.g. 1x-1x1")
        spec = sizes
    return make_mesh(tuple(spec)) if isinstance(spec, (tuple, list)) else spec


def _positive(name: str, value, default=None, cli: bool = False) -> int:
    if value is None or value == "auto":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise EvalError(f"{arg_text(name, value, cli)}: expected a positive integer")
    return number


def _check_vocabulary(tokenizer, config, where: str) -> None:
    """A tokenizer with more tokens than the model's embedding has rows is refused: its ids from vocab_size
    up index past the table, and the scores would be garbage (NaN bits-per-byte, chance accuracy)."""
    if len(tokenizer) > config.vocab_size:
        raise EvalError(f"{where} has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: "
                        f"ids {config.vocab_size} and up have no embedding row; use the tokenizer the model was "
                        "trained with")


# -- the lm-eval model --------------------------------------------------------------------------------


@register_model("normistral")
class NorMistralLM(TemplateLM):
    """lm-eval model over the JAX model. Either `pretrained` (a path) or `model` (an nnx model, e.g. the
    training run's current parameters) with `tokenizer` (a path or a transformers tokenizer)."""

    def __init__(self, pretrained: str | None = None, *, model=None, tokenizer=None, dtype: str = "bfloat16",
                 quantize: str | None = None, group_size=None, lora: str | None = None, batch_size=8,
                 max_length=None, mesh=None,
                 min_row=MIN_ROW, max_gen_toks=256, add_bos_token: bool | None = None, prefix_token_id=None,
                 device=None, max_batch_size=None, progress: bool = True, cli: bool = False, **unknown):
        """cli: name arguments in errors as `normistral eval`'s flags (`--max-length 4`), not as
        model_args (`max_length=4`)."""
        super().__init__()
        from inference.generator import Generator
        from inference.quantize import DEFAULT_GROUP_SIZE, MODES

        if unknown:
            raise EvalError(f"unknown model argument(s) for normistral: {', '.join(sorted(unknown))}")
        if (pretrained is None) == (model is None):
            raise EvalError("normistral needs pretrained=PATH (or, from Python, model=...)")
        del device, max_batch_size  # lm-eval passes these to every model; placement follows `mesh`
        self.cli = cli
        self.batch_size_per_call = _positive("batch_size", batch_size, 8, cli)
        self._min_row = _positive("min_row", min_row, MIN_ROW)
        self._max_gen_toks = _positive("max_gen_toks", max_gen_toks, 256)
        if group_size is not None and quantize != "int4":  # it would be ignored
            raise EvalError("--group-size needs --quantize int4" if cli else "group_size= needs quantize=int4")
        group_size = _positive("group_size", group_size, DEFAULT_GROUP_SIZE, cli)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.progress = progress
        if model is None:
            import jax.numpy as jnp

            from jaxmodel import storage
            from jaxmodel.config import MistralConfig
            from jaxmodel.convert import config_source, resolve_lora
            from jaxmodel.hub import resolve_model
            from jaxmodel.lora import LoraError, error_line

            path = resolve_model(pretrained)  # a hub id -> its snapshot in the cache (a HubError if it cannot be)
            if not storage.isdir(path):
                raise EvalError(f"{pretrained}: model directory not found")
            if quantize not in (None, *MODES):
                raise EvalError(f"{arg_text('quantize', quantize, cli)}: expected one of {', '.join(MODES)}")
            try:
                jdtype = jnp.dtype(dtype)
            except TypeError:
                raise EvalError(f"{arg_text('dtype', dtype, cli)}: expected float32, bfloat16 or float16") from None
            tok = load_tokenizer(tokenizer, path, flag="--tokenizer " if cli else "tokenizer=")
            # Before the weights load: the tokenizer must fit the model's vocabulary.
            config = MistralConfig.from_hf(config_source(path))
            _check_vocabulary(tok, config, self._tokenizer_name(tokenizer))
            if lora is not None:  # the adapter against config.json, before the weights load
                try:
                    lora = resolve_lora(lora, config)
                except LoraError as e:
                    raise EvalError(error_line(e, "--lora " if cli else "lora=", lora)) from None
            # warmup=False: no KV cache pool at load (scoring needs none); the first generation builds it
            self.generator = Generator.from_pretrained(path, tokenizer=tok, dtype=jdtype, mesh=_mesh(mesh),
                                                       quantize=quantize, group_size=group_size, progress=progress,
                                                       lora=lora, warmup=False)
            self.pretrained = pretrained
        else:
            if lora is not None:  # it would be ignored: merge_lora the model first
                raise EvalError("lora= needs pretrained=PATH (merge the adapter into model= with merge_lora)")
            tok = load_tokenizer(tokenizer, None) if isinstance(tokenizer, str) else tokenizer
            if tok is None:
                raise EvalError("model= needs tokenizer= (a directory or a transformers tokenizer)")
            _check_vocabulary(tok, model.config, self._tokenizer_name(tokenizer))
            self.generator = Generator(model, tok)
            self.pretrained = None
        self.tokenizer = self.generator.tokenizer
        self.config = self.generator.config
        context = self.config.max_position_embeddings
        self._max_length = _positive("max_length", max_length, context, cli)
        if self._max_length > context:
            raise EvalError(f"{arg_text('max_length', self._max_length, cli)}: exceeds the model's context of "
                            f"{context} tokens")
        self.scorer = Scorer(self.generator.parts, max_length=self._max_length,
                             batch_size=self.batch_size_per_call, min_row=self._min_row)

    def _tokenizer_name(self, tokenizer) -> str:
        if isinstance(tokenizer, str):
            return arg_text("tokenizer", tokenizer, self.cli)
        return "the tokenizer" if tokenizer is not None else "the model's own tokenizer"

    # lm-eval's properties ----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.config.num_params(), "model_dtype": self.config.dtype,
                "pretrained": self.pretrained}

    # tokenization (HFLM's rules, so both models see the same tokens) --------------------------------

    def _special(self, add_special_tokens: bool | None) -> dict:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        if self.add_bos_token is not None:
            return {"add_special_tokens": self.add_bos_token}
        return {}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        special = self._special(add_special_tokens)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False  # the string already starts with BOS
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _encode_prompt(self, string: str) -> list[int]:
        """A generation context as HFLM's batch encoder tokenizes it."""
        if has_bos_prefix(string, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        else:
            special = self._special(None)
        return list(self.tokenizer(string, **special)["input_ids"])

    # log-likelihoods ------------------------------------------------------------------------------

    def _bar(self, total: int, desc: str, disable: bool):
        import jax

        return tqdm(total=total, desc=desc, file=sys.stderr,
                    disable=disable or not self.progress or jax.process_index() != 0)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        with self._bar(len(requests), "Running loglikelihood requests", disable_tqdm) as bar:
            try:
                results = self.scorer.score([ScoreRequest(ctx, cont) for _, ctx, cont in requests],
                                            progress=bar.update)
            except ScoreError as e:  # a continuation longer than the window: the user's max_length
                raise EvalError(f"{arg_text('max_length', self.max_length, self.cli)}: {e}") from None
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # generation -----------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        with self._bar(len(requests), "Running generate_until requests", disable_tqdm) as bar:
            for members in groups.values():
                gen_kwargs = requests[members[0]].args[1]
                if not isinstance(gen_kwargs, dict):
                    raise EvalError(f"generation kwargs must be a dict, got {gen_kwargs!r}")
                kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = int(kwargs.pop("max_gen_toks"))
                max_ctx = self.max_length - max_gen
                if max_ctx <= 0:
                    raise EvalError(f"{arg_text('max_length', self.max_length, self.cli)}: leaves no room for a prompt "
                                    f"with max_gen_toks={max_gen}")
                sampling = _sampling(kwargs)
                stop_ids = self.generator.stop_ids([s for s in until if s])
                encoded = {i: self._encode_prompt(requests[i].args[0])[-max_ctx:] or [self.prefix_token_id]
                           for i in members}
                order = sorted(members, key=lambda i: (-len(encoded[i]), requests[i].args[0]))
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    new = self.generator.generate_ids([encoded[i] for i in chunk], max_new_tokens=max_gen,
                                                      stop_ids=stop_ids, **sampling)
                    for i, ids in zip(chunk, new):
                        text = postprocess_generated_text(self.tok_decode(ids), until, None)
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return results


def _sampling(kwargs: dict) -> dict:
    """lm-eval generation kwargs -> Generator sampling options (greedy when temperature is 0 / unset)."""
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    do_sample = bool(kwargs.get("do_sample", False)) and temperature > 0
    out = {"do_sample": do_sample}
    if do_sample:
        out.update(temperature=temperature, top_k=int(kwargs.get("top_k", 0) or 0),
                   top_p=float(kwargs.get("top_p", 1.0) or 1.0), seed=int(kwargs.get("seed", 0) or 0))
    return out


def main(argv=None) -> None:
    """lm-eval's command line with `normistral` registered (`python -m inference.lm_eval_adapter run ...`).
    The model's user errors (a bad model argument, a missing directory, a tokenizer that does not fit) are
    one line `normistral: error: ...` and exit status 2, as from `normistral eval`."""
    from lm_eval.__main__ import cli_evaluate

    from inference.generate import GenerateError
    from jaxmodel.config import ConfigError
    from jaxmodel.storage import StorageError

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except (EvalError, GenerateError, ConfigError, StorageError) as e:
        sys.stdout.flush()
        print(f"normistral: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
