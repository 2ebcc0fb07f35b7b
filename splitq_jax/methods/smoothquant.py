"""SmoothQuant: per-channel scales that move activation outliers into the weights.

``c_j = max|W_:,j|^(1 - alpha) / max|X_:,j|^alpha`` from calibration maxima (Xiao et al., 2023);
``X diag(c)`` and ``diag(1/c) W^T`` replace ``X`` and ``W^T``, then both are quantized
round-to-nearest. Closed form: nothing is trained.

As in the reference implementation, only the inputs a norm feeds are smoothed (q/k/v after the
input norm, gate/up after the post-attention norm), so every ``c`` folds into a norm and the
checkpoint runs transform-free; o_proj and down_proj are quantized round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitq_jax.config import MethodConfig
from splitq_jax.methods.transform import TransformMethod, TransformSpec


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(TransformSpec):
    """``smooth_alpha``: migration strength (0: scales from the weights only, 1: from the
    activations only). ``block_inputs``: statistics from the full-precision (``"fp"``) or the
    already-quantized (``"quantized"``) outputs of the previous block."""

    smooth_alpha: float = 0.5
    block_inputs: str = "fp"
    weight_solver: str = "rtn"  # main weights rounded to nearest, or by "gptq" (methods/gptq/backend.py)

    method = "smoothquant"

    def engine_config(self) -> MethodConfig:
        return self._engine("smoothquant")


METHOD = TransformMethod("smoothquant", SmoothQuantConfig, "closed-form channel scales, alpha 0.5")
