"""The transform engine: the two steps of :class:`~splitq_jax.methods.base.Method` for every
method that is a setting of one learned (or closed-form) transform of each linear group.

RTN (no transform), SmoothQuant (closed-form diagonals), FlatQuant (learned Kronecker transform
and clipping) and SplitQ (FlatQuant plus MOCD's outlier groups and the CWS / MAC branches) differ
only in their engine setting (``Config.engine_config()``):

* calibrate: :func:`splitq_jax.calibrate.fit_block` collects the statistics the setting reads
  (:func:`splitq_jax.calibrate.engine_statistics`), initialises every group
  (:func:`splitq_jax.methods.splitq.split_linear.init_group`) and trains what the setting learns;
* fold: :func:`fold_block` quantizes and packs every stored weight (the residual ``R`` of the main
  path at ``b`` bits, outlier weights and branch factors at ``max(b, 4)``), then the canonical
  fold (:func:`splitq_jax.quantized.fold.canonicalize`) moves diagonals into norms and drops
  identity transforms.
* ``weight_solver="gptq"`` (SmoothQuant, FlatQuant, SplitQ): between the two, GPTQ rounds each
  linear's stored main weight under the Hessian of its transformed, activation-quantized input
  (:mod:`splitq_jax.methods.gptq.backend`), and the fold stores those codes.

The folded block run in fake-quant reproduces the calibrated block, because both go through
:func:`splitq_jax.quantized.group.apply_group` with weights from the same
:func:`splitq_jax.methods.splitq.split_linear.prequant_weights`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax

from splitq_jax import calibrate as cal
from splitq_jax.methods.splitq import split_linear as sl
from splitq_jax.block import GROUP_NORM
from splitq_jax.config import MethodConfig, as_engine, method_config
from splitq_jax.methods.base import Method, QuantSpec
from splitq_jax.quantized.fold import canonicalize, pack_weight
from splitq_jax.quantized.group import Bits, is_spec

Tree = dict[str, Any]


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
        engine = as_engine(cfg)
        result = cal.fit_block(block_params, data, engine, bcfg, key=key, on_step=on_step)
        if engine.weight_solver == "gptq":
            from splitq_jax.methods.gptq import backend  # the GPTQ family loads only when used

            result = backend.solve_block(result, data, engine, bcfg)
        return result

    def fold_block(self, result: cal.CalibResult, cfg: Any, bcfg: Any = None) -> dict:
        return fold_block(result.qparams, result.qconsts, cfg, bcfg=bcfg, solved=result.solved)


def fold_group(params: Tree, consts: Tree, cfg: Any, solved: Tree | None = None) -> Tree:
    """``{"acts", "split", "weights", "biases"}`` of one calibrated group: every weight quantized
    once and packed (:mod:`splitq_jax.quantized.schema` gives the layout); ``solved``
    (``{name: Solution}``) replaces the rounding of the main weights."""
    cfg = as_engine(cfg)
    specs = sl.prequant_weights(params, consts, cfg, Bits.of(cfg))
    weights = jax.tree_util.tree_map(lambda s: pack_weight(s, cfg.w_symmetric), specs, is_leaf=is_spec)
    if solved:
        from splitq_jax.methods.gptq.method import pack_solution

        weights = {n: {**w, "main": pack_solution(solved[n], cfg)} for n, w in weights.items()}
    return {"acts": sl.act_params(params), "split": consts["split"], "weights": weights,
            "biases": sl.biases_of(consts)}


def fold_block(qparams: Tree, qconsts: Tree, cfg: Any, *, fold_norms: bool = True, bcfg: Any = None,
               solved: Tree | None = None) -> Tree:
    """Fold a calibrated block: ``{"norms": {...}, "groups": {group: folded group}}``, canonical
    (``fold_norms=False`` keeps every diagonal online). ``bcfg`` names the norm before each group
    (default: the decoder block's); ``solved``: a weight back end's main weights (``CalibResult.solved``)."""
    cfg = as_engine(cfg)
    solved = solved or {}
    block = {"norms": {k: dict(v) for k, v in qconsts["norms"].items()},
             "groups": {g: fold_group(qparams[g], qconsts[g], cfg, solved.get(g)) for g in qparams}}
    group_norm = (GROUP_NORM if bcfg is None else bcfg.group_norm) if fold_norms else {}
    return canonicalize(block, group_norm, cfg.main_path)
