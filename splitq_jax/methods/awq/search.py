"""AWQ's two searches as jitted functions of one block: the per-group scale grid and the
per-(row, group) clipping ratio.

Scale groups (:func:`scale_groups`): a group whose input a norm produces takes its scale into
that norm (``attn_in``, ``mlp_in``: AWQ's ``input_layernorm -> q/k/v`` and
``post_attention_layernorm -> gate/up``); in the decoder block ``mlp_out`` takes it into
``up_proj``'s rows (``act(g) * (u / s) = (act(g) * u) / s``), and ``attn_out`` into ``v_proj``'s rows
only when every head has its own value head (attention is linear in ``v``; grouped-query
attention shares a value head between query heads, so AWQ skips it there, and so do we). Other
groups keep ``s = 1``.

The inspected output (what a candidate is scored on) is the module that the scaled linears feed:
the attention output ``o_proj`` for ``attn_in``, the MLP output ``down_proj`` for ``mlp_in``, the
group's own outputs otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from splitq_jax.block import BlockConfig
from splitq_jax.errors import SplitqError
from splitq_jax.quant import fake_quant

Tree = dict[str, Any]
# The group whose output a candidate scale of this group is scored on.
INSPECTED = {"attn_in": "attn_out", "mlp_in": "mlp_out"}
# Linears the clip search leaves alone (AWQ: their errors are amplified by the softmax's q.k).
NO_CLIP = ("q_proj", "k_proj", "qkv")
SCALE_MIN = 1e-4


@dataclass(frozen=True)
class ScaleGroup:
    """``group``'s scale is folded into ``into``: ``("norm", key)`` or ``("linear", name)`` (that
    linear's output rows); the candidates are scored on ``inspect``'s outputs."""

    group: str
    into: tuple[str, str]
    inspect: str


def scale_groups(bcfg: Any) -> tuple[ScaleGroup, ...]:
    """The block's scale groups in forward order (see the module docstring)."""
    out = []
    for g in bcfg.groups:
        if g in bcfg.group_norm:
            out.append(ScaleGroup(g, ("norm", bcfg.group_norm[g]), INSPECTED.get(g, g)))
        elif isinstance(bcfg, BlockConfig) and g == "mlp_out":
            out.append(ScaleGroup(g, ("linear", "up_proj"), g))
        elif isinstance(bcfg, BlockConfig) and g == "attn_out" and bcfg.num_heads == bcfg.num_kv_heads:
            out.append(ScaleGroup(g, ("linear", "v_proj"), g))
    return tuple(out)


class ScaleFoldError(SplitqError):
    """A scale group whose scale cannot be folded where it should go (shapes disagree)."""


def check_foldable(params: Tree, bcfg: Any) -> None:
    """Every scale group's producer has one output per channel the group reads (norm parameters,
    or a linear's rows); otherwise a :class:`ScaleFoldError` naming both shapes."""
    for sg in scale_groups(bcfg):
        width = int(params[bcfg.groups[sg.group][0]]["w"].shape[1])
        kind, key = sg.into
        have = ({n: tuple(v.shape) for n, v in params[key].items() if v is not None} if kind == "norm"
                else {"w": tuple(params[key]["w"].shape)})
        rows = [shape[0] for shape in have.values()]
        if any(r != width for r in rows):
            raise ScaleFoldError(f"the scale of {sg.group} ({width} input channels) cannot be folded into {kind} "
                                 f"{key} (shapes {have}): this block's architecture has no place for it; quantize "
                                 "it with rtn or gptq instead")


def candidate_scales(x_mean: jax.Array, alphas: tuple[float, ...], w_mean: jax.Array | None = None) -> jax.Array:
    """``(K, d)``: for each ``alpha``, ``s = max(x_mean^alpha, 1e-4)`` (``duo``: divided by
    ``w_mean^(1 - alpha) + 1e-4``), normalised by ``sqrt(max s * min s)``. ``alpha = 0`` gives
    ``s = 1`` exactly."""
    a = jnp.asarray(alphas, jnp.float32)[:, None]
    s = jnp.maximum(jnp.power(x_mean[None, :], a), SCALE_MIN)
    if w_mean is not None:
        s = s / (jnp.power(w_mean[None, :], 1.0 - a) + SCALE_MIN)
    return s / jnp.sqrt(jnp.max(s, axis=-1, keepdims=True) * jnp.min(s, axis=-1, keepdims=True))


def weight_mean(ws: list[jax.Array], group_size: int | None) -> jax.Array:
    """``(d,)``: AutoAWQ's duo-scaling weight statistic, the mean over the output rows of all of
    ``ws`` of ``|w| / max |w|`` within each row's weight group."""
    rows = jnp.concatenate([jnp.asarray(w, jnp.float32) for w in ws], axis=0)
    o, d = rows.shape
    g = d if group_size is None else group_size
    a = jnp.abs(rows).reshape(o, d // g, g)
    a = a / jnp.maximum(jnp.max(a, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(a.reshape(o, d), axis=0)


def quantized_linear(inp: jax.Array, w: jax.Array, b: jax.Array | None, s: jax.Array, cfg: Any) -> jax.Array:
    """``Q_a(x / s) @ Q_w(W s)^T + b``: a scaled linear as it runs once ``s`` is folded."""
    a = fake_quant(inp / s.astype(inp.dtype), cfg.a_bits, symmetric=cfg.a_symmetric)
    wq = fake_quant(jnp.asarray(w, jnp.float32) * s, cfg.w_bits, symmetric=cfg.w_symmetric, group_size=cfg.w_group_size)
    y = a @ wq.T.astype(a.dtype)
    return y if b is None else y + b.astype(a.dtype)


def _forward(params: Tree, scaled: Tree, x, cos, sin, mask, bcfg: Any, cfg: Any, seen: dict) -> None:
    """Run the block with the groups in ``scaled`` (``{group: s (d,)}``) quantized with their scale,
    the others full precision; every group's input and output go into ``seen``."""

    def linear(group: str, inp: jax.Array) -> dict[str, jax.Array]:
        seen[("in", group)] = inp
        out = {}
        for name in bcfg.groups[group]:
            p = params[name]
            if group in scaled:
                out[name] = quantized_linear(inp, p["w"], p.get("b"), scaled[group], cfg)
            else:
                y = inp @ p["w"].T.astype(inp.dtype)
                out[name] = y if p.get("b") is None else y + p["b"].astype(inp.dtype)
        seen[("out", group)] = out
        return out

    bcfg.forward(params, linear, x, cos, sin, mask)


@functools.lru_cache(maxsize=64)
def search_jit(bcfg: Any, cfg: Any, sg: ScaleGroup) -> Any:
    """``(params, earlier, cands (K, d), x, x_fp, cos, sin, mask, w_tok (B, N)) -> (K,)``: per
    candidate scale of ``sg.group``, ``sum_t w_t sum_c f(y_t - y~_t)`` over ``sg.inspect``'s
    outputs (``f``: squared or absolute error by ``cfg.search_loss``), against the full-precision
    block on ``x_fp``. ``earlier``: ``{group: s}`` quantized with their scale (the quantized path;
    empty for full-precision block inputs). The candidates are one ``vmap``; only the block up to
    the inspected group is computed (the rest is dead code to the compiler)."""
    absolute = cfg.search_loss == "mae"

    @jax.jit
    def run(params, earlier, cands, x, x_fp, cos, sin, mask, w_tok):
        ref: dict = {}
        _forward(params, {}, x_fp, cos, sin, mask, bcfg, cfg, ref)
        target = ref[("out", sg.inspect)]

        def one(s):
            seen: dict = {}
            _forward(params, {**earlier, sg.group: s}, x, cos, sin, mask, bcfg, cfg, seen)
            total = 0.0
            for name, y in seen[("out", sg.inspect)].items():
                dlt = y.astype(jnp.float32) - target[name].astype(jnp.float32)
                e = jnp.abs(dlt) if absolute else jnp.square(dlt)
                total = total + jnp.sum(jnp.sum(e, axis=-1) * w_tok)
            return total

        return jax.vmap(one)(cands)

    return run


@functools.lru_cache(maxsize=64)
def inputs_jit(bcfg: Any, cfg: Any) -> Any:
    """``(params, scaled, x, cos, sin, mask) -> {group: input (B, N, d)}`` with the groups in
    ``scaled`` quantized (see :func:`search_jit`)."""

    @jax.jit
    def run(params, scaled, x, cos, sin, mask):
        seen: dict = {}
        _forward(params, scaled, x, cos, sin, mask, bcfg, cfg, seen)
        return {g: seen[("in", g)] for g in bcfg.groups}

    return run


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "group_size", "ratios"))
def clip_search(w: jax.Array, x: jax.Array, *, bits: int, symmetric: bool, group_size: int | None,
                ratios: tuple[float, ...]) -> jax.Array:
    """AWQ's clip search for rows ``w (o, d)`` on tokens ``x (T, d)``: per row and weight group the
    ratio ``r`` of ``ratios`` whose clamp ``[-r max|w|, r max|w|]`` then round-to-nearest gives the
    least ``mean_t (x_t . (w^ - w))^2`` over that group's columns (partial dot products: the
    group's own error, cross-group terms ignored, as in AWQ). Returns ``(o, G)``; ties keep the
    earlier ratio."""
    o, d = w.shape
    g = d if group_size is None else group_size
    wg = w.astype(jnp.float32).reshape(o, d // g, g)
    xg = x.astype(jnp.float32).reshape(x.shape[0], d // g, g)
    ref = jnp.einsum("tGg,oGg->oGt", xg, wg)
    amax = jnp.max(jnp.abs(wg), axis=-1, keepdims=True)
    best_err = jnp.full((o, d // g), jnp.inf, jnp.float32)
    best = jnp.ones((o, d // g), jnp.float32)
    for r in ratios:
        m = amax * jnp.float32(r)
        q = fake_quant(jnp.clip(wg, -m, m), bits, symmetric=symmetric)
        err = jnp.mean(jnp.square(jnp.einsum("tGg,oGg->oGt", xg, q) - ref), axis=-1)
        better = err < best_err
        best_err = jnp.where(better, err, best_err)
        best = jnp.where(better, jnp.float32(r), best)
    return best


def clip_rows(w: jax.Array, x: jax.Array, cfg: Any, row_chunk: int = 256) -> jax.Array:
    """``w (o, d)`` clamped per (row, group) by :func:`clip_search`'s ratios, the rows searched in
    chunks of ``row_chunk`` (the search holds ``(rows, G, T)`` errors)."""
    o, d = w.shape
    g = d if cfg.w_group_size is None else cfg.w_group_size
    chunk = min(row_chunk, o)
    pad = (-o) % chunk
    wp = jnp.pad(jnp.asarray(w, jnp.float32), ((0, pad), (0, 0)))
    ratios = [clip_search(wp[i:i + chunk], x, bits=cfg.w_bits, symmetric=cfg.w_symmetric, group_size=cfg.w_group_size,
                          ratios=cfg.clip_ratios) for i in range(0, o + pad, chunk)]
    r = jnp.concatenate(ratios, axis=0)[:o]
    wg = jnp.asarray(w, jnp.float32).reshape(o, d // g, g)
    m = jnp.max(jnp.abs(wg), axis=-1, keepdims=True) * r[..., None]
    return jnp.clip(wg, -m, m).reshape(o, d)


__all__ = ["INSPECTED", "NO_CLIP", "ScaleFoldError", "ScaleGroup", "candidate_scales", "check_foldable", "clip_rows",
           "clip_search", "inputs_jit",
           "quantized_linear", "scale_groups", "search_jit", "weight_mean"]
