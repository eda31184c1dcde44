"""Weight-only int8/int4 quantization for inference: the implementation lives in `jaxmodel.quant` (training's
QLoRA uses it too, and training must not import inference/); every public name is re-exported here unchanged."""

from jaxmodel.quant import (  # noqa: F401
    DEFAULT_GROUP_SIZE,
    LOAD_CHUNK_ELEMENTS,
    MODES,
    QUANTIZED,
    QArray,
    abstract_quantized_state,
    dequantize,
    effective_group,
    group_axis,
    load_transform,
    mode_for,
    param_bytes,
    quantize_array,
    quantize_model,
    quantize_numpy,
    quantized_shapes,
    scale_shape,
    stored_bytes,
)
