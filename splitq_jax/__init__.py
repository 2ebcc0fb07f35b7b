"""splitq_jax: post-training low-bit quantization of vision-language models (SplitQ and peers).

The functional API in a few names; each lives in the module of its pipeline step:

* methods: :func:`method_config`, :class:`MethodConfig` (``splitq_jax.config``)
* one block: :func:`calibrate_block`, :func:`make_block_data` (``splitq_jax.calibrate``),
  :func:`fold_block` (``splitq_jax.fold``)
* a whole model: :func:`calibrate_model` (``splitq_jax.pipeline``)
* checkpoints: :func:`save_quantized`, :func:`load_quantized`, :class:`QuantizedModel`
"""

from splitq_jax.calibrate import calibrate_block, make_block_data
from splitq_jax.config import MethodConfig, method_config
from splitq_jax.export import CheckpointError, save_quantized, verify_checkpoint
from splitq_jax.fold import fold_block
from splitq_jax.pipeline import calibrate_model
from splitq_jax.runtime import QuantizedModel, load_quantized

__all__ = [
    "CheckpointError", "MethodConfig", "QuantizedModel", "calibrate_block", "calibrate_model", "fold_block",
    "load_quantized", "make_block_data", "method_config", "save_quantized", "verify_checkpoint",
]
