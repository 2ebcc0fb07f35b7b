"""GPTQ as the weight back end of a transform method: ``--method flatquant --weight-solver gptq``.

A transform method (SmoothQuant, FlatQuant, SplitQ) calibrates a block as usual; then, instead of
rounding each linear's stored main weight to nearest at the fold, GPTQ rounds it under the Hessian
of what that weight multiplies at inference: the group's main-path input after the online
transform and the activation quantizer, ``X = Q(x_m P)`` (FlatQuant's ``--gptq`` collects its
Hessian at the same place: transformed, activation-quantized inputs of the folded layer). Groups go
in true-sequential order (q/k/v, o, gate/up, down), each collected with the earlier ones already
GPTQ-rounded, over the block's calibration samples in batches.

* The weight solved is the one the fold stores: FlatQuant's ``W P^-T``; SplitQ's residual
  ``R^T = W_m P^-T - (L1 L2)^T`` (its CWS / MAC branches stay as fitted, so GPTQ repairs only the
  rounding of the residual, ``||(R - R^) X||``).
* The learned weight clipping stays: every fitted range of a row (per row, or per group as the
  loop reaches it) is scaled by its ``sigmoid(logits)``. On an identity Hessian the back end is
  therefore exactly the fold's round-to-nearest (a test checks the codes).
* Not solved (round-to-nearest as before): the outlier groups' weights and the branch factors, at
  ``max(b, 4)`` bits on a few percent of the columns.
* Solver settings are GPTQ's defaults (:class:`~splitq_jax.methods.gptq.config.GptqConfig`:
  blocks of 128 columns, damping 0.01 of the mean diagonal with retries, no act-order, groups
  fitted as the loop reaches them); the damping used is kept in each ``Solution.damp``.

The result's ``solved`` holds each linear's :class:`~splitq_jax.methods.gptq.solver.Solution`;
the transform engine's fold packs those codes instead of rounding (so the folded block's forward
is the block this module scored, and its ``final_loss`` is the one reported).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from splitq_jax import calibrate as cal
from splitq_jax import sharding
from splitq_jax.calib import collectors as col
from splitq_jax.calib.stats import token_weight
from splitq_jax.config import MethodConfig
from splitq_jax.methods.gptq import solver
from splitq_jax.methods.gptq.config import GptqConfig
from splitq_jax.methods.splitq import split_linear as sl
from splitq_jax.quantized.group import Bits, apply_group, main_act

Tree = dict[str, Any]


@functools.lru_cache(maxsize=32)
def _capture_jit(cfg: MethodConfig, bcfg: Any) -> Any:
    """``(qparams, qconsts, mains, x, cos, sin, mask, modality) -> ({group: Q(x_m P) (B, N, km)}, y)``:
    the calibrated block in fake-quant with each linear's main weight taken from ``mains``
    (``{group: {name: (d_out, km)}}``: solved, or the fold's round-to-nearest), everything else as
    the transform engine computes it."""
    bits = Bits.of(cfg)

    @jax.jit
    def capture(qparams, qconsts, mains, x, cos, sin, mask, modality):
        tmask = cal.text_mask_of(modality, cfg)
        seen: dict[str, jax.Array] = {}

        def linear(group: str, inp: jax.Array) -> dict[str, jax.Array]:
            p, c = qparams[group], qconsts[group]
            weights = sl.fake_quant_weights(sl.prequant_weights(p, c, cfg, bits), cfg)
            weights = {n: {**w, "main": mains[group][n]} for n, w in weights.items()}
            acts = sl.act_params(p)
            seen[group] = main_act(acts, c["split"], inp, cfg, bits)
            return apply_group(acts, c["split"], weights, sl.biases_of(c), inp, tmask, cfg, bits)

        y = bcfg.forward(qconsts["norms"], linear, x, cos, sin, mask)
        return seen, y

    return capture


def solve_block(result: cal.CalibResult, data: cal.BlockData, cfg: MethodConfig, bcfg: Any) -> cal.CalibResult:
    """``result`` (a transform method's calibrated block) with every main weight GPTQ-rounded
    (``solved``) and ``final_loss`` the block loss of that state (see the module docstring)."""
    gcfg = GptqConfig(w_bits=cfg.w_bits, a_bits=cfg.a_bits, w_symmetric=cfg.w_symmetric,
                      a_symmetric=cfg.a_symmetric, w_group_size=cfg.w_group_size, batch_size=cfg.batch_size)
    bits = Bits.of(cfg)
    qparams, qconsts = result.qparams, result.qconsts
    specs = {g: sl.prequant_weights(qparams[g], qconsts[g], cfg, bits) for g in qparams}
    mains = {g: {n: sl.fake_quant_weights({"m": s["main"]}, cfg)["m"] for n, s in specs[g].items()} for g in specs}
    capture = _capture_jit(cfg, bcfg)
    order = tuple(g for g in bcfg.groups if g in qparams)
    rounds = [(g,) for g in order] if gcfg.true_sequential else [order]
    solved: dict[str, dict[str, solver.Solution]] = {}
    for groups in rounds:
        accs: dict[str, col.Accumulator] = {}
        for b in sharding.batches(data, gcfg.batch_size):
            seen, _ = capture(qparams, qconsts, mains, b.x, b.cos, b.sin, b.mask, b.modality)
            modality = jnp.asarray(b.modality).reshape(-1)
            for g in groups:
                xq = seen[g].reshape(-1, seen[g].shape[-1])
                accs.setdefault(g, col.Accumulator(("hessian",), int(xq.shape[-1])))
                accs[g].update(col.Tokens(xq, modality, token_weight(b).reshape(-1)))
        for g in groups:
            h = jnp.asarray(accs[g].results()["hessian"].matrix)
            solved[g] = {}
            for name, spec in specs[g].items():
                main = spec["main"]
                ratio = None if main.clip is None else (jax.nn.sigmoid(main.clip["max"]), jax.nn.sigmoid(main.clip["min"]))
                try:
                    sol = solver.solve(main.w, h, bits=main.bits, symmetric=cfg.w_symmetric, group_size=main.group_size,
                                       block_size=gcfg.block_size, damp=gcfg.damp, ratio=ratio)
                except solver.SolverError as e:
                    raise solver.SolverError(f"{g}/{name} (--weight-solver gptq): {e}") from None
                solved[g][name] = sol
                mains[g][name] = sol.weight.astype(jnp.float32)
    num = den = 0.0
    for b in sharding.batches(data, gcfg.batch_size):
        _, y = capture(qparams, qconsts, mains, b.x, b.cos, b.sin, b.mask, b.modality)
        num += float(_weighted_sum(y, b, cfg))
        den += float(jnp.sum(cal.token_weights(b.modality, cfg, b.weight)))
    final = num / max(den, 1e-12)
    if not jnp.isfinite(final):
        raise cal.NonFiniteError(f"the block loss after --weight-solver gptq is {final}; check the data and model")
    return dataclasses.replace(result, final_loss=final, solved=solved)


def _weighted_sum(y: jax.Array, b: cal.BlockData, cfg: MethodConfig) -> jax.Array:
    """Token-weighted sum of the per-token MSE (the numerator of :func:`splitq_jax.calibrate.evaluate`)."""
    err = jnp.mean(jnp.square(y.astype(jnp.float32) - b.y.astype(jnp.float32)), axis=-1)
    return jnp.sum(err * cal.token_weights(b.modality, cfg, b.weight))


__all__ = ["solve_block"]
