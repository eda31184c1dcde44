"""normistral-jax inference: batched generation in one jitted while-loop, the engine, int8 weights, AOT checks.

`inference` imports from `jaxmodel/` only (never from `training/`).

- `generate(model, input_ids, attention_mask, *, max_new_tokens, eos_token_ids, pad_token_id, ...)`:
  new tokens [B, max_new_tokens] as numpy (generate.py).
- `Generator.from_pretrained(path, *, tokenizer, dtype, mesh, quantize).generate(prompts, ...)`:
  strings in, strings out, as the model card uses the model (generator.py).
- `static_pages`, `prefill`, `decode_step` (generate.py: generate's page pool and its two steps; the cache
  itself, `Cache` / `KVPages`, lives with the model in jaxmodel/kv_cache.py);
  `quantize_model`, `QArray` (quantize.py); `compile_decode` (aot.py).

The names load on first use (PEP 562), so the command line's parser (inference/cli.py) imports no JAX.
"""

import importlib
import sys
import types

_EXPORTS = {name: "inference.generate" for name in ("GenerateError", "bucket_batch", "bucket_length", "decode_step",
                                                     "generate", "prefill", "static_pages")}
_EXPORTS.update(Generator="inference.generator", QArray="inference.quantize", param_bytes="inference.quantize",
                quantize_model="inference.quantize")
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`inference.generate` is the function (the module stays importable as inference.generate): once the
    submodule loads, the import system sets it as this package's attribute, which would hide the function."""

    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType) and hasattr(value, "generate"):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
