"""GPTQ, GPTAQ and VLM-PTQ on the method seam: statistics of each group input, the column solve
(:mod:`splitq_jax.methods.gptq.solver`) of each linear, and the fold into plain packed weights.

Per block, for each group of linears sharing an input (q/k/v, o, gate/up, down; in that order
with ``true_sequential``, each collected after the earlier ones were quantized), over the block's
calibration samples in batches:

* the Hessian ``H = sum_t w_t x_t x_t^T`` of the inputs the linears see at inference: the
  quantized path's, activation-quantized per token when the setting quantizes activations (as
  FlatQuant and GPTAQ's ``enable_aq_calibration`` do);
* GPTAQ / VLM-PTQ: the cross term ``D = sum_t w_t (x~_t - x_t) x_t^T`` with the full-precision
  path's inputs ``x~`` (full-precision block inputs through the full-precision block), streamed in
  lockstep batch by batch rather than kept per linear;
* VLM-PTQ: the per-modality diagonals ``sum x^2`` over vision and over text tokens.

VLM-PTQ's reconstructed parts (no public code): the channel importance is ``M_mu = mu * mean_v
x^2 + (1 - mu) * mean_t x^2`` (per-token means, so that the token counts of the two modalities do
not decide the balance); for each ``mu`` the grid (scale, zero per row or group) minimising the
``M_mu``-weighted squared weight error over 80 shrink ratios is rounded to nearest, and the ``mu``
whose rounding has the least error against the full-precision output ``||W X~ - W^ X||^2`` wins.
That error is computed exactly from ``H`` and ``D`` over all calibration tokens (``X~ X^T = D + H``)
rather than on a small batch. The GPTAQ loop then runs on the winning grid with the target shift.

The folded block has no transform and no channel split: each linear's codes, scales and zero
points are stored as they are (the runtime quantizes activations per token when ``a_bits`` is set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import calibrate as cal
from splitq_jax.calib import collectors as col
from splitq_jax import sharding
from splitq_jax.calib.stats import token_weight
from splitq_jax.methods import plain
from splitq_jax.methods.base import Method
from splitq_jax.methods.gptq import solver
from splitq_jax.methods.gptq.config import BIT_DEFAULTS, GptaqConfig, GptqConfig, VlmPtqConfig
from splitq_jax.quant import QParams

Tree = dict[str, Any]


def _statistics(params: Tree, data: cal.BlockData, cfg: GptqConfig, bcfg: Any, qweights: Tree,
                groups: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Stream the block's samples in batches and accumulate, per group in ``groups``, the
    statistics ``cfg`` needs (see the module docstring)."""
    paired = isinstance(cfg, GptaqConfig)
    names = ("hessian",) + (("modality_diag",) if isinstance(cfg, VlmPtqConfig) else ())
    capture_q = plain.capture_jit(bcfg, cfg.a_bits, cfg.a_symmetric)
    capture_fp = plain.capture_jit(bcfg, None, True)
    # on a data mesh each batch is split over the devices; the collectors' sums are then global
    params, qweights = sharding.replicate((params, qweights))
    accs: dict[str, col.Accumulator] = {}
    cross: dict[str, col.Accumulator] = {}
    for b in sharding.batches(data, cfg.batch_size):
        args = (b.cos, b.sin, b.mask)
        seen_q, _ = capture_q(params, qweights, b.x, *args)
        seen_fp = capture_fp(params, {}, b.x if b.x_fp is None else b.x_fp, *args)[0] if paired else None
        modality = jnp.asarray(b.modality).reshape(-1)
        w = token_weight(b).reshape(-1)
        for g in groups:
            xq = seen_q[g].reshape(-1, seen_q[g].shape[-1])
            if g not in accs:
                accs[g] = col.Accumulator(names, int(xq.shape[-1]))
                if paired:
                    cross[g] = col.Accumulator(("cross",), int(xq.shape[-1]))
            accs[g].update(col.Tokens(xq, modality, w))
            if paired:
                xf = seen_fp[g].reshape(-1, xq.shape[-1])
                cross[g].update(col.Tokens(xf, modality, w, x_q=xq))
    out = {}
    for g in groups:
        res = accs[g].results()
        if paired:
            res.update(cross[g].results())
        out[g] = res
    return out


def _importance(diag: Any, mu: float) -> jax.Array:
    """VLM-PTQ's ``M_mu = mu * mean_v x^2 + (1 - mu) * mean_t x^2`` ``(d,)``."""
    v = np.asarray(diag.vision) / max(float(diag.n_vision), 1.0)
    t = np.asarray(diag.text) / max(float(diag.n_text), 1.0)
    return jnp.asarray(mu * v + (1.0 - mu) * t, jnp.float32)


def _solve_linear(w: jax.Array, st: dict[str, Any], cfg: GptqConfig) -> solver.Solution:
    h = jnp.asarray(st["hessian"].matrix)
    kw = dict(bits=cfg.w_bits, symmetric=cfg.w_symmetric, group_size=cfg.w_group_size, block_size=cfg.block_size,
              damp=cfg.damp, act_order=cfg.act_order, static_groups=cfg.static_groups, clip_search=cfg.clip_search)
    if not isinstance(cfg, GptaqConfig):
        return solver.solve(w, h, **kw)
    d_cross = jnp.asarray(st["cross"].matrix)
    kw.update(d_cross=d_cross, alpha=cfg.alpha, outer_update=cfg.outer_update)
    if not isinstance(cfg, VlmPtqConfig):
        return solver.solve(w, h, **kw)
    best = None
    w_cross = jnp.matmul(w, h + d_cross, precision=solver.HIGHEST)  # the candidates share W (D + H)
    for mu in cfg.mus:
        grid = solver.fit_static_grid(w, cfg.w_bits, cfg.w_symmetric, cfg.w_group_size,
                                      importance=_importance(st["modality_diag"], mu))
        w_hat = _dequantize_rtn(w, grid, cfg)
        err = float(solver.output_error(w, w_hat, h, w_cross=w_cross))
        if best is None or err < best[0]:
            best = (err, grid)
    return solver.solve(w, h, **kw, shift_scale=cfg.shift_scale or None, grid=best[1])


def _dequantize_rtn(w: jax.Array, grid: solver.Grid, cfg: GptqConfig) -> jax.Array:
    """Round ``w (o, d)`` to nearest on ``grid`` ((o, G) per group of input columns)."""
    o, d = w.shape
    g = d if cfg.w_group_size is None else cfg.w_group_size
    wg = w.reshape(o, d // g, g)
    s, z = grid.scale[..., None], grid.zero[..., None]
    return ((solver._codes(wg, s, z, cfg.w_bits, cfg.w_symmetric) - z) * s).reshape(o, d)


@dataclass(frozen=True)
class HessianMethod(Method):
    """GPTQ, GPTAQ and VLM-PTQ: one implementation, the config class decides the statistics and
    the solve."""

    def calibrate_block(self, block_params: Tree, data: cal.BlockData, cfg: GptqConfig, bcfg: Any, *,
                        key: Any = None, on_step: Any = None, context: Any = None) -> cal.CalibResult:
        order = tuple(bcfg.groups)
        # A whole-model pass's token weights (TLQ) weigh the statistics; the reported losses stay unweighted.
        stat_data = data if context is None else data._replace(weight=context["weight"])
        rounds = [(g,) for g in order] if cfg.true_sequential else [order]
        solutions: dict[str, dict[str, solver.Solution]] = {}
        qweights: Tree = {}
        for groups in rounds:
            stats = _statistics(block_params, stat_data, cfg, bcfg, qweights, groups)
            for g in groups:
                solutions[g] = {}
                for name in bcfg.groups[g]:
                    w = jnp.asarray(block_params[name]["w"], jnp.float32)
                    try:
                        solutions[g][name] = _solve_linear(w, stats[g], cfg)
                    except solver.SolverError as e:
                        raise solver.SolverError(f"{g}/{name}: {e}") from None
            qweights = {**qweights, **{g: {n: s.weight for n, s in solutions[g].items()} for g in groups}}
        # the report's baseline: round-to-nearest on the same grid (the solver's grid rule is RTN's)
        init_loss = plain.block_loss(block_params, plain.rtn_weights(block_params, cfg, bcfg), data, cfg, bcfg)
        final_loss = plain.block_loss(block_params, qweights, data, cfg, bcfg)
        plain.check_finite_loss(final_loss, cfg.method)
        consts = {"norms": {k: dict(block_params[k]) for k in bcfg.norm_keys},
                  "biases": {g: {n: block_params[n].get("b") for n in bcfg.groups[g]} for g in order}}
        return cal.CalibResult(solutions, consts, init_loss, final_loss, [], {})

    def fold_block(self, result: cal.CalibResult, cfg: GptqConfig, bcfg: Any = None) -> Tree:
        weights = {g: {n: pack_solution(s, cfg) for n, s in sols.items()} for g, sols in result.qparams.items()}
        return plain.fold_plain(result.qconsts["norms"], weights, result.qconsts["biases"])


def pack_solution(sol: solver.Solution, cfg: GptqConfig):
    """A solved linear's codes, scales and zero points as a stored packed tensor."""
    o, d = sol.codes.shape
    g = d if cfg.w_group_size is None else cfg.w_group_size
    shape = (o, d // g, g) if cfg.w_group_size is not None else (o, d)
    stat = (o, d // g, 1) if cfg.w_group_size is not None else (o, 1)
    p = QParams(sol.codes.reshape(shape), sol.grid.scale.reshape(stat).astype(jnp.float32),
                sol.grid.zero.reshape(stat).astype(jnp.int32))
    return plain.pack_codes(p, (o, d), cfg)


GPTQ = HessianMethod("gptq", GptqConfig, "column-wise OBS rounding under the input Hessian", bit_defaults=BIT_DEFAULTS)
GPTAQ = HessianMethod("gptaq", GptaqConfig, "GPTQ toward the full-precision output (asymmetric cross term)",
                      bit_defaults=BIT_DEFAULTS)
VLM_PTQ = HessianMethod("vlm-ptq", VlmPtqConfig, "GPTAQ + target shift + modality-weighted grid per layer",
                        bit_defaults=BIT_DEFAULTS)

__all__ = ["GPTAQ", "GPTQ", "HessianMethod", "VLM_PTQ", "pack_solution"]
