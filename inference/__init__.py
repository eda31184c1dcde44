"""normistral-jax inference: KV cache, batched generation in one jitted while-loop, int8 weights, AOT checks.

`inference` imports from `jaxmodel/` only (never from `training/`).

- `generate(model, input_ids, attention_mask, *, max_new_tokens, eos_token_ids, pad_token_id, ...)`:
  new tokens [B, max_new_tokens] as numpy (generate.py).
- `Generator.from_pretrained(path, *, tokenizer, dtype, mesh, quantize).generate(prompts, ...)`:
  strings in, strings out, as the model card uses the model (generator.py).
- `KVCache`, `init_cache` (kv_cache.py); `forward_cached`, `prefill`, `decode_step` (generate.py);
  `quantize_model`, `QArray` (quantize.py); `compile_decode` (aot.py).
"""

from inference.generate import (
    GenerateError,
    bucket_batch,
    bucket_length,
    decode_step,
    forward_cached,
    generate,  # the function; the module stays importable as inference.generate
    prefill,
)
from inference.generator import Generator
from inference.kv_cache import KVCache, init_cache
from inference.quantize import QArray, param_bytes, quantize_model

__all__ = ["GenerateError", "Generator", "KVCache", "QArray", "bucket_batch", "bucket_length", "decode_step",
           "forward_cached", "generate", "init_cache", "param_bytes", "prefill", "quantize_model"]
