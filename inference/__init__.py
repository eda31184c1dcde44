"""normistral-jax inference: batched generation in one jitted while-loop, the engine, int8 weights, AOT checks.

`inference` imports from `jaxmodel/` only (never from `training/`).

- `generate(model, input_ids, attention_mask, *, max_new_tokens, eos_token_ids, pad_token_id, ...)`:
  new tokens [B, max_new_tokens] as numpy (generate.py).
- `Generator.from_pretrained(path, *, tokenizer, dtype, mesh, quantize).generate(prompts, ...)`:
  strings in, strings out, as the model card uses the model (generator.py).
- `static_pages`, `prefill`, `decode_step` (generate.py: generate's page pool and its two steps; the cache
  itself, `Cache` / `KVPages`, lives with the model in jaxmodel/kv_cache.py);
  `quantize_model`, `QArray` (quantize.py); `compile_decode` (aot.py).
"""

from inference.generate import (
    GenerateError,
    bucket_batch,
    bucket_length,
    decode_step,
    generate,  # the function; the module stays importable as inference.generate
    prefill,
    static_pages,
)
from inference.generator import Generator
from inference.quantize import QArray, param_bytes, quantize_model

__all__ = ["GenerateError", "Generator", "QArray", "bucket_batch", "bucket_length", "decode_step", "generate",
           "param_bytes", "prefill", "quantize_model", "static_pages"]
