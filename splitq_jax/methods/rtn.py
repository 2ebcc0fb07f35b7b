"""RTN: round-to-nearest weights and per-token activations, nothing calibrated.

The baseline every other method is measured against: each weight row and each token's activation
row quantized with its own min-max scale (``splitq_jax.quant``), no transform, no search.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitq_jax.config import MethodConfig
from splitq_jax.methods.transform import TransformMethod, TransformSpec


@dataclass(frozen=True, kw_only=True)
class RtnConfig(TransformSpec):
    """RTN has no knobs of its own: the shared quantization spec is all of it."""

    method = "rtn"

    def engine_config(self) -> MethodConfig:
        return self._engine("rtn")


METHOD = TransformMethod("rtn", RtnConfig, "round-to-nearest, nothing calibrated")
