"""splitq_jax: post-training low-bit quantization of vision-language models (SplitQ and peers).

The functional API in a few names; each lives in the module of its pipeline step:

* methods: :func:`get_method`, :func:`get_config`, ``METHODS`` (``splitq_jax.methods``);
  :func:`method_config`, :class:`MethodConfig`: the engine setting a method config runs as
* one block: :class:`BlockConfig`, :func:`init_block_params` (``splitq_jax.block``),
  :func:`make_block_data` (``splitq_jax.calibrate``), then the method's two steps
  :func:`calibrate_block` and :func:`fold_block` (``splitq_jax.methods``); each takes a method
  config or an engine setting
* a whole model: :func:`quantize_model` (load data, quantize, export: ``splitq_jax.quantize``)
  and :func:`quantize_decoder` (its in-memory core, ``splitq_jax.pipeline``)
* checkpoints: :func:`save_quantized`, :func:`load_quantized`, :class:`QuantizedModel`
* errors a user can fix: :class:`SplitqError` (``splitq_jax.errors``)

Names are imported on first use (PEP 562), so that ``import splitq_jax.runtime`` for inference
does not pull in the calibration engine and its optimiser.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "splitq_jax.quantized.export", "save_quantized": "splitq_jax.quantized.export",
    "verify_checkpoint": "splitq_jax.quantized.export",
    "MethodConfig": "splitq_jax.config", "method_config": "splitq_jax.config",
    "METHODS": "splitq_jax.methods", "get_config": "splitq_jax.methods", "get_method": "splitq_jax.methods",
    "calibrate_block": "splitq_jax.methods", "fold_block": "splitq_jax.methods",
    "make_block_data": "splitq_jax.calibrate",
    "BlockConfig": "splitq_jax.block", "init_block_params": "splitq_jax.block",
    "quantize_decoder": "splitq_jax.pipeline", "quantize_model": "splitq_jax.quantize",
    "QuantizedModel": "splitq_jax.runtime", "load_quantized": "splitq_jax.runtime",
    "SplitqError": "splitq_jax.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'splitq_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
