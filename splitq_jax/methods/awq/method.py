"""AWQ on the method seam: per block, the scale search of each scale group, the scales folded
into the norms and linears before them, the clip search, and round-to-nearest into plain packed
weights (the folded checkpoint has no transform left: the runtime sees an ordinary
weight-quantized model).

Per block (:meth:`ScaleSearchMethod.calibrate_block`):

1. for each scale group in forward order (:func:`~splitq_jax.methods.awq.search.scale_groups`):
   ``mean|x|`` of its input over the non-pad tokens, the candidates ``s(alpha)`` for the grid,
   each scored by the token-weighted error of the inspected output over every calibration sample
   (batches of ``batch_size``; the grid is one ``vmap``), the lowest kept (ties: the smaller
   ``alpha``). With ``block_inputs="quantized"`` the candidate runs on the quantized path's block
   input with the earlier groups quantized at their chosen scale (MBQ's "distort"); the target is
   always the full-precision block on full-precision inputs;
2. the scales folded: the group's columns times ``s``, the producing norm (all its parameters) or
   linear's rows (and bias) divided by ``s``: an exact rewrite in full precision;
3. the clip search on every linear but q/k, on ``clip_tokens`` evenly strided non-pad tokens of
   its (scaled) input;
4. round to nearest on the configured grid: the fold packs exactly the weights the reported
   ``final_loss`` was computed with.

Per-token weights: the search and the losses weigh token ``t`` by the block data's weight
(:func:`~splitq_jax.calib.stats.token_weight`: 1 on non-pad tokens unless a method sets its own,
as MBQ does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import calibrate as cal
from splitq_jax.calib.stats import token_weight
from splitq_jax.methods import plain
from splitq_jax.methods.awq import search
from splitq_jax.methods.awq.config import WA_DEFAULTS, AwqConfig
from splitq_jax.methods.base import Method
from splitq_jax.quant import fake_quant, quantize

Tree = dict[str, Any]


def _token_picks(weight: np.ndarray, n: int) -> np.ndarray:
    """Flat indices ``s * N + t`` of at most ``n`` evenly strided tokens of weight > 0."""
    valid = np.flatnonzero(weight.reshape(-1) > 0)
    stride = max(1, len(valid) // n)
    return valid[::stride][:n]


def _input_stats(params: Tree, scaled: Tree, data: cal.BlockData, cfg: AwqConfig, bcfg: Any,
                 groups: tuple[str, ...], picks: np.ndarray) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Per group of ``groups``: ``mean|x|`` ``(d,)`` of its input over the non-pad tokens, and its
    input at the ``picks`` tokens ``(T, d)``, with the groups in ``scaled`` quantized."""
    run = search.inputs_jit(bcfg, cfg)
    valid = np.asarray(data.modality) != 0
    sums: dict[str, jax.Array] = {}
    picked: dict[str, list] = {g: [] for g in groups}
    n_tok = data.x.shape[1]
    for i in range(0, data.x.shape[0], cfg.batch_size):
        sl = slice(i, i + cfg.batch_size)
        seen = run(params, scaled, data.x[sl], data.cos[sl], data.sin[sl], data.mask[sl])
        v = jnp.asarray(valid[sl], jnp.float32)[..., None]
        local = picks[(picks >= i * n_tok) & (picks < (i + cfg.batch_size) * n_tok)] - i * n_tok
        for g in groups:
            x = seen[g].astype(jnp.float32)
            sums[g] = sums.get(g, 0.0) + jnp.sum(jnp.abs(x) * v, axis=(0, 1))
            picked[g].append(x.reshape(-1, x.shape[-1])[local])
    count = max(float(valid.sum()), 1.0)
    return ({g: sums[g] / count for g in groups}, {g: jnp.concatenate(picked[g], axis=0) for g in groups})


def search_scale(params: Tree, earlier: Tree, data: cal.BlockData, cfg: AwqConfig, bcfg: Any,
                 sg: search.ScaleGroup, x_mean: jax.Array, weight: jax.Array) -> tuple[jax.Array, float, jax.Array]:
    """The grid search of one scale group: ``(s (d,), alpha, losses (K,))``, the losses
    normalised by ``sum_t w_t`` times the inspected width."""
    w_mean = (search.weight_mean([params[n]["w"] for n in bcfg.groups[sg.group]], cfg.w_group_size)
              if cfg.duo_scaling else None)
    cands = search.candidate_scales(x_mean, cfg.alphas, w_mean)
    run = search.search_jit(bcfg, cfg, sg)
    x_fp = data.x if data.x_fp is None else data.x_fp
    total = jnp.zeros((len(cfg.alphas),), jnp.float32)
    for i in range(0, data.x.shape[0], cfg.batch_size):
        sl = slice(i, i + cfg.batch_size)
        total = total + run(params, earlier, cands, data.x[sl], x_fp[sl], data.cos[sl], data.sin[sl], data.mask[sl],
                            weight[sl])
    width = sum(int(params[n]["w"].shape[0]) for n in bcfg.groups[sg.inspect])
    losses = total / (max(float(jnp.sum(weight)), 1e-12) * width)
    if not bool(jnp.all(jnp.isfinite(losses))):
        raise cal.NonFiniteError(f"the scale search of {sg.group} gives non-finite errors; check the data and model")
    k = int(jnp.argmin(losses))  # the first minimum: the smallest alpha among ties
    return cands[k], cfg.alphas[k], losses


def apply_scales(params: Tree, scales: dict[str, jax.Array], bcfg: Any) -> Tree:
    """``params`` with every scale folded (float32): the group's columns times ``s``, the producing
    norm (every parameter) or linear's rows and bias divided by ``s``. Exact in full precision."""
    out = {k: {n: jnp.asarray(v, jnp.float32) if v is not None else None for n, v in p.items()}
           for k, p in params.items()}
    for sg in search.scale_groups(bcfg):
        s = scales[sg.group]
        for n in bcfg.groups[sg.group]:
            out[n]["w"] = out[n]["w"] * s[None, :]
        kind, key = sg.into
        if kind == "norm":
            out[key] = {n: v / s for n, v in out[key].items()}
        else:
            out[key]["w"] = out[key]["w"] / s[:, None]
            if out[key].get("b") is not None:
                out[key]["b"] = out[key]["b"] / s
    return out


@dataclass(frozen=True)
class ScaleSearchMethod(Method):
    """AWQ (and, with its token weights, MBQ): see the module docstring."""

    def config(self, bits: str | None = None, **options: Any) -> AwqConfig:
        from splitq_jax.config import parse_bits

        _, a = parse_bits(bits or self.default_bits)
        # With activations quantized, per-channel symmetric weights unless the user says otherwise.
        return super().config(bits, **{**(WA_DEFAULTS if a is not None else {}), **options})

    def token_weights(self, data: cal.BlockData, cfg: AwqConfig, sg: search.ScaleGroup,
                      context: Any = None) -> jax.Array:
        """``(S, N)`` weights of the search loss for ``sg`` (AWQ: the block data's own; ``context``:
        what :meth:`model_pass` found for this block)."""
        return token_weight(data)

    def calibrate_block(self, block_params: Tree, data: cal.BlockData, cfg: AwqConfig, bcfg: Any, *,
                        key: Any = None, on_step: Any = None, context: Any = None) -> cal.CalibResult:
        params = block_params
        search.check_foldable(params, bcfg)
        order = tuple(bcfg.groups)
        weight = token_weight(data)
        picks = _token_picks(np.asarray(weight), cfg.clip_tokens)
        distort = cfg.block_inputs == "quantized"
        ones = {g: jnp.ones((params[bcfg.groups[g][0]]["w"].shape[1],), jnp.float32) for g in order}
        by_group = {sg.group: sg for sg in search.scale_groups(bcfg)}
        means: dict[str, jax.Array] = {}
        tokens: dict[str, jax.Array] = {}
        if not distort:  # full-precision inputs: one pass gives every group's input
            means, tokens = _input_stats(params, {}, data, cfg, bcfg, order, picks)
        scales: dict[str, jax.Array] = {}
        alphas: dict[str, float] = {}
        for idx, g in enumerate(order):
            earlier = {e: scales.get(e, ones[e]) for e in order[:idx]} if distort else {}
            if distort:
                m, t = _input_stats(params, earlier, data, cfg, bcfg, (g,), picks)
                means[g], tokens[g] = m[g], t[g]
            if g in by_group:
                sg = by_group[g]
                scales[g], alphas[g], _ = search_scale(params, earlier, data, cfg, bcfg, sg, means[g],
                                                       self.token_weights(data, cfg, sg, context))
        folded = apply_scales(params, scales, bcfg)
        weights: Tree = {}
        for g in order:
            s = scales.get(g, ones[g])
            weights[g] = {}
            for n in bcfg.groups[g]:
                w = folded[n]["w"]
                if cfg.clip_search and n not in search.NO_CLIP:
                    w = search.clip_rows(w, tokens[g] / s, cfg)
                weights[g][n] = w
        qweights = {g: {n: fake_quant(w, cfg.w_bits, symmetric=cfg.w_symmetric, group_size=cfg.w_group_size)
                        for n, w in ws.items()} for g, ws in weights.items()}
        init_loss = plain.block_loss(params, plain.rtn_weights(params, cfg, bcfg), data, cfg, bcfg)
        final_loss = plain.block_loss(folded, qweights, data, cfg, bcfg)
        plain.check_finite_loss(final_loss, cfg.method)
        consts = {"norms": {k: folded[k] for k in bcfg.norm_keys},
                  "biases": {g: {n: folded[n].get("b") for n in bcfg.groups[g]} for g in order},
                  "alphas": alphas}
        return cal.CalibResult({"weights": weights}, consts, init_loss, final_loss, [], {})

    def fold_block(self, result: cal.CalibResult, cfg: AwqConfig, bcfg: Any = None) -> Tree:
        packed = {g: {n: plain.pack_codes(quantize(w, cfg.w_bits, symmetric=cfg.w_symmetric,
                                                   group_size=cfg.w_group_size), w.shape, cfg)
                      for n, w in ws.items()} for g, ws in result.qparams["weights"].items()}
        return plain.fold_plain(result.qconsts["norms"], packed, result.qconsts["biases"])


AWQ = ScaleSearchMethod("awq", AwqConfig, "activation-aware weight scales searched per group, clip search, RTN",
                        default_bits="w4a16")

__all__ = ["AWQ", "ScaleSearchMethod", "apply_scales", "search_scale"]
