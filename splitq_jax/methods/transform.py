"""The transform engine: the two steps of :class:`~splitq_jax.methods.base.Method` for every
method that is a setting of one learned (or closed-form) transform of each linear group.

RTN (no transform), SmoothQuant (closed-form diagonals), FlatQuant (learned Kronecker transform
and clipping) and SplitQ (FlatQuant plus MOCD's outlier groups and the CWS / MAC branches) differ
only in their engine setting (``Config.engine_config()``):

* calibrate: :func:`splitq_jax.calibrate.fit_block` collects the statistics the setting reads
  (:func:`splitq_jax.calibrate.engine_statistics`), initialises every group
  (:func:`splitq_jax.split_linear.init_group`) and trains what the setting learns;
* fold: :func:`splitq_jax.quantized.fold.fold_block` packs the weights, moves diagonals into norms and
  drops identity transforms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from splitq_jax import calibrate as cal
from splitq_jax.quantized import fold
from splitq_jax.config import MethodConfig, as_engine, method_config
from splitq_jax.methods.base import Method, QuantSpec


@dataclass(frozen=True, kw_only=True)
class TransformSpec(QuantSpec):
    """The config of a transform-engine method: it runs as the engine setting
    :meth:`engine_config` returns, which also validates every field."""

    def validate(self) -> None:
        self.engine_config()

    def engine_config(self) -> MethodConfig:
        """The engine setting that runs this method (:func:`splitq_jax.config.method_config`)."""
        raise NotImplementedError

    def _engine(self, preset: str, **extra: Any) -> MethodConfig:
        """The engine preset ``preset`` at this config's bit widths with every field applied."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        w, a = fields.pop("w_bits"), fields.pop("a_bits")
        cfg = method_config(preset, "w4a4", **fields, **extra)
        return cfg.replace(w_bits=w, a_bits=a)


@dataclass(frozen=True)
class TransformMethod(Method):
    def calibrate_block(self, block_params: Any, data: cal.BlockData, cfg: Any, bcfg: Any, *,
                        key: Any = None, on_step: Any = None) -> cal.CalibResult:
        return cal.fit_block(block_params, data, as_engine(cfg), bcfg, key=key, on_step=on_step)

    def fold_block(self, result: cal.CalibResult, cfg: Any, bcfg: Any = None) -> dict:
        return fold.fold_block(result.qparams, result.qconsts, as_engine(cfg), bcfg=bcfg)
