"""The Hessian-based weight solvers on one linear: GPTQ, GPTAQ and VLM-PTQ's column loop.

One linear ``Y = W X`` with ``W: (o, d)`` and the statistics of its (quantized-path) inputs
``X``: the Hessian ``H = sum_t w_t x_t x_t^T (d, d)`` and, for the asymmetric methods, the cross
term ``D = sum_t w_t (x~_t - x_t) x_t^T (d, d)`` with the full-precision path's inputs ``x~``.

GPTQ (Frantar et al. 2023) rounds the columns of ``W`` one at a time and moves the rounding
error of column ``q`` onto the columns still free, the Optimal Brain Surgeon step under the
shared Hessian, in its Cholesky form: with the damped ``H^-1 = U^T U`` (``U`` upper triangular),
``e = (w_q - Q(w_q)) / U_qq`` and ``W[:, q:] -= e U[q, q:]``. Columns go in blocks of ``B``; inside
a block every update is applied at once, to the columns right of the block as one matrix
product after it (the "lazy batch" update, same result up to round-off).

GPTAQ (Li et al. 2025) targets the full-precision output ``W X~`` from the quantized input
``X``: the step gains ``+ w_q P[q, q:]`` with ``P = alpha * triu_1(D U^T) U`` (``alpha`` 0.25 as in
the official code; the strict upper triangle leaves the column being rounded alone). In the
official code the update of the columns right of a block uses the block's *quantized* values
(``outer_update="quantized"``, the default here); ``"original"`` uses the values before rounding.

VLM-PTQ (Deng & Huang, CVPR 2026) rounds the shifted target ``w_q (1 + C_q)`` with
``C = scale * diag(D U^T) * diag(U)`` (the diagonal term GPTAQ's ``P`` leaves out), on a grid
``(scale, zero)`` fixed before the loop (:func:`fit_grid` with per-channel importance weights).

Quantizer grid: ``x ~= s (q - z)`` per row or per group of ``g`` input columns, with the rule of
:mod:`splitq_jax.quant` (a grid fitted to a row with no updates gives exactly its RTN codes).
Grouped grids are fitted when the loop reaches the group (``static=False``, GPTQ's default: on
the already-updated weights; blocks are then ``g`` columns long so that a group's columns are
all up to date when it is fitted) or once up front on the original weights (``static=True``;
act-order with groups needs this: the stored format keeps groups of consecutive original columns).

The loop is a ``fori_loop`` over blocks holding a ``fori_loop`` over the block's columns:
compile time does not grow with the width ``d``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from splitq_jax.errors import SplitqError
from splitq_jax.quant import qrange, scale_from_stats, scale_recip4, times_reciprocal

HIGHEST = jax.lax.Precision.HIGHEST
# GPTQ's MSE clip search (IST gptq quant.py): 80 shrink ratios 1, 0.99, ..., 0.21 of the range,
# scored by sum |Q(w) - w|^2.4.
CLIP_STEPS, CLIP_NORM = 80, 2.4


class SolverError(SplitqError):
    """The solve cannot go on (the damped Hessian stays singular, the shapes disagree)."""


class Grid(NamedTuple):
    """Quantizer parameters ``(o, G)``: one scale and zero point per row and group (G = 1 per row)."""

    scale: jax.Array
    zero: jax.Array


class Solution(NamedTuple):
    """codes: ``(o, d)`` int32 in the grid's integer range; grid: :class:`Grid`; weight: ``(o, d)``
    the dequantized result ``s (q - z)``; loss: GPTQ's proxy ``sum (w - Q(w))^2 / U_qq^2 / 2``;
    damp: the relative damping that made the Cholesky factor finite."""

    codes: jax.Array
    grid: Grid
    weight: jax.Array
    loss: jax.Array
    damp: float


# ------------------------------------------------------------------------------------ the grid


def _codes(w, scale, zero, bits: int, symmetric: bool):
    """Integer codes of ``w`` on the grid (``quant.quantize``'s rule); all operands broadcast."""
    q_min, q_max = qrange(bits, symmetric)
    return jnp.clip(jnp.round(times_reciprocal(w, scale_recip4(scale))) + zero, q_min, q_max)


def _grid_of(xmax, xmin, bits: int, symmetric: bool):
    scale = scale_from_stats(xmax, xmin, bits, symmetric)
    zero = jnp.zeros_like(scale) if symmetric else jnp.round(times_reciprocal(-xmin, scale_recip4(scale)))
    return scale, zero


def fit_grid(w: jax.Array, bits: int, symmetric: bool, *, clip_search: bool = False,
             importance: jax.Array | None = None, ratio: tuple[jax.Array, jax.Array] | None = None) -> Grid:
    """Per-row grid of ``w: (o, g)`` -> :class:`Grid` of ``(o, 1)`` arrays.

    The range is the row's min / max, times ``ratio = (r_max, r_min)`` ``(o, 1)`` when given (a
    learned clipping, :mod:`splitq_jax.quant`'s ``sigmoid(logits)``; applied as there, before the
    asymmetric range is widened to contain 0). ``clip_search`` shrinks
    it by ``1 - i/100``, ``i < 80``, keeping per row the ratio with the least ``sum_n m_n |Q(w_n) -
    w_n|^p``: ``p = 2.4`` and ``m = 1`` (GPTQ's MSE search) or ``p = 2`` and ``m = importance (g,)``
    (VLM-PTQ's modality-weighted search)."""
    w = w if w.dtype == jnp.float64 else w.astype(jnp.float32)
    xmax = jnp.max(w, axis=-1, keepdims=True)
    xmin = jnp.min(w, axis=-1, keepdims=True)
    if ratio is not None:
        xmax, xmin = ratio[0].astype(w.dtype) * xmax, ratio[1].astype(w.dtype) * xmin
    if not symmetric:
        xmax, xmin = jnp.maximum(xmax, 0.0), jnp.minimum(xmin, 0.0)
    if not clip_search and importance is None:
        return Grid(*_grid_of(xmax, xmin, bits, symmetric))
    norm = CLIP_NORM if importance is None else 2.0
    m = jnp.ones((w.shape[-1],), w.dtype) if importance is None else importance.astype(w.dtype)
    steps = CLIP_STEPS if (clip_search or importance is not None) else 1

    def error(shrink):
        s, z = _grid_of(xmax * shrink, xmin * shrink, bits, symmetric)
        deq = (_codes(w, s, z, bits, symmetric) - z) * s
        return jnp.sum(jnp.abs(deq - w) ** norm * m, axis=-1, keepdims=True), s, z

    def body(i, best):
        err, s, z = error(1.0 - i.astype(w.dtype) / 100.0)
        better = err < best[0]
        return jnp.where(better, err, best[0]), jnp.where(better, s, best[1]), jnp.where(better, z, best[2])

    init = error(jnp.ones((), w.dtype))
    _, s, z = jax.lax.fori_loop(1, steps, body, init)
    return Grid(s, z)


def fit_static_grid(w: jax.Array, bits: int, symmetric: bool, group_size: int | None, *,
                    clip_search: bool = False, importance: jax.Array | None = None,
                    ratio: tuple[jax.Array, jax.Array] | None = None) -> Grid:
    """The grid of every row (and group of ``group_size`` consecutive columns) of ``w: (o, d)``
    fitted up front: :class:`Grid` of ``(o, G)`` arrays (``ratio``: per-row, shared by the row's
    groups, see :func:`fit_grid`)."""
    o, d = w.shape
    g = d if group_size is None else group_size
    if d % g:
        raise SolverError(f"group size {g} does not divide the input width {d}")
    wg = w.reshape(o, d // g, g)
    imp = None if importance is None else importance.reshape(d // g, g)
    fit = lambda a, m: fit_grid(a, bits, symmetric, clip_search=clip_search, importance=m, ratio=ratio)  # noqa: E731
    grid = jax.vmap(fit, in_axes=(1, None if imp is None else 0), out_axes=1)(wg, imp)
    return Grid(grid.scale[..., 0], grid.zero[..., 0])


# ------------------------------------------------------------------------------- the Hessian


@jax.jit
def _inverse_cholesky(h: jax.Array, damp: jax.Array) -> jax.Array:
    d = h.shape[0]
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(d, dtype=h.dtype)
    lower = jnp.linalg.cholesky(h)
    inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(d, dtype=h.dtype))
    return jnp.linalg.cholesky(inv, upper=True)


def inverse_cholesky(h: jax.Array, damp: float = 0.01, retries: int = 3) -> tuple[jax.Array, float]:
    """``U`` upper triangular with ``U^T U = (H + damp * mean(diag H) I)^-1``, and the damping used.

    JAX's Cholesky returns NaNs for a matrix that is not positive definite instead of raising, so
    the factor is checked, and the damping grows tenfold (at most ``retries`` times, up to 1)
    until it is finite; after that a :class:`SolverError` says what to change."""
    tried = []
    for k in range(retries + 1):
        lam = min(damp * 10.0**k, 1.0) if k else damp
        if lam in tried:
            break
        tried.append(lam)
        u = _inverse_cholesky(h, jnp.asarray(lam, h.dtype))
        if bool(jnp.all(jnp.isfinite(u))):
            return u, lam
    raise SolverError(f"the input Hessian is not positive definite even with damping {', '.join(map(str, tried))} "
                      "of its mean diagonal (too few calibration tokens for the layer width, or non-finite "
                      "inputs); give more calibration samples or a larger --damp")


def check_statistics(h: jax.Array, d_cross: jax.Array | None = None) -> None:
    """Refuse statistics no solve can use: non-finite entries (NaN or inf activations), or an
    all-zero Hessian (no calibration token reached the layer: every input column would be "dead"
    and the weight rounded to zero)."""
    for name, m in (("Hessian", h), ("cross term", d_cross)):
        if m is not None and not bool(jnp.all(jnp.isfinite(m))):
            raise SolverError(f"the input {name} holds NaN or inf: the layer's calibration activations are not "
                              "finite (check the data and the model's weights; float16 overflow is a common cause)")
    if not bool(jnp.any(jnp.diag(h) > 0)):
        raise SolverError("the input Hessian is all zero: no calibration token reached this layer (every token is "
                          "padding or has weight 0); give calibration samples with real tokens")


def prepare(w: jax.Array, h: jax.Array, d_cross: jax.Array | None = None):
    """GPTQ's dead columns: an input channel that never fires (``H_ii = 0``) gets ``H_ii = 1`` and
    its weights (and cross-term column) zeroed, so it neither moves nor blocks the factorisation."""
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[None, :], 0.0, w)
    if d_cross is not None:
        d_cross = jnp.where(dead[None, :], 0.0, d_cross)
    return w, h, d_cross


def gptaq_correction(d_cross: jax.Array, u: jax.Array, alpha: float) -> jax.Array:
    """GPTAQ's ``P = alpha * triu_1(D U^T) U`` ``(d, d)``."""
    du = jnp.matmul(d_cross, u.T, precision=HIGHEST)
    return alpha * jnp.matmul(jnp.triu(du, 1), u, precision=HIGHEST)


def target_shift(d_cross: jax.Array, u: jax.Array, scale: float) -> jax.Array:
    """VLM-PTQ's ``C = scale * diag(D U^T) * diag(U)`` ``(d,)``: column ``q`` rounds ``w_q (1 + C_q)``."""
    return scale * jnp.sum(d_cross * u, axis=1) * jnp.diag(u)


# ------------------------------------------------------------------------------ the column loop


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "block", "dynamic", "clip_search", "outer_quantized",
                                             "asymmetric"))
def _column_loop(w, u, p, c, grid: Grid, gidx, ratio, *, bits: int, symmetric: bool, block: int, dynamic: bool,
                 clip_search: bool, outer_quantized: bool, asymmetric: bool):
    """``w: (o, dp)``, ``u, p: (dp, dp)``, ``c: (dp,)``, ``gidx: (dp,)`` group of each column in
    ``grid`` (static grids); ``dp`` a multiple of ``block``. With ``dynamic`` the grid of each
    block is fitted on entry (``grid`` is then a placeholder and ``gidx`` the block number)."""
    o, dp = w.shape
    cols = jnp.arange(dp)

    def block_body(b, carry):
        w, codes, scales, zeros, loss = carry
        i1 = b * block
        w1 = jax.lax.dynamic_slice(w, (0, i1), (o, block))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))
        p1 = jax.lax.dynamic_slice(p, (i1, i1), (block, block))
        if dynamic:
            bs, bz = fit_grid(w1, bits, symmetric, clip_search=clip_search, ratio=ratio)
            bs, bz = bs[:, 0], bz[:, 0]
            scales = jax.lax.dynamic_update_slice(scales, bs[:, None], (0, b))
            zeros = jax.lax.dynamic_update_slice(zeros, bz[:, None], (0, b))

        def col_body(j, inner):
            w1, q1, e1, c1, loss = inner
            col = jax.lax.dynamic_index_in_dim(w1, j, axis=1, keepdims=False)
            if dynamic:
                s, z = bs, bz
            else:
                g = gidx[i1 + j]
                s, z = grid.scale[:, g], grid.zero[:, g]
            code = _codes(col * (1.0 + c[i1 + j]), s, z, bits, symmetric)
            qv = (code - z) * s
            d = u1[j, j]
            e = (col - qv) / d
            w1 = w1 - e[:, None] * u1[j][None, :]
            if asymmetric:
                w1 = w1 + col[:, None] * p1[j][None, :]
            w1 = jax.lax.dynamic_update_index_in_dim(w1, qv, j, axis=1)  # exactly on the grid
            q1 = jax.lax.dynamic_update_index_in_dim(q1, code.astype(jnp.int32), j, axis=1)
            e1 = jax.lax.dynamic_update_index_in_dim(e1, e, j, axis=1)
            c1 = jax.lax.dynamic_update_index_in_dim(c1, col, j, axis=1)
            return w1, q1, e1, c1, loss + jnp.sum(jnp.square(col - qv)) / (d * d) / 2

        zero_block = jnp.zeros((o, block), w.dtype)
        w1, q1, e1, c1, loss = jax.lax.fori_loop(
            0, block, col_body, (w1, jnp.zeros((o, block), jnp.int32), zero_block, zero_block, loss))
        # The lazy update of every column right of the block (U and P are upper triangular, so
        # the rows of the block reach only columns >= i1; the block's own are masked out).
        right = (cols >= i1 + block)[None, :]
        u_rows = jax.lax.dynamic_slice(u, (i1, 0), (block, dp))
        p_rows = jax.lax.dynamic_slice(p, (i1, 0), (block, dp))
        upd = jnp.matmul(e1, u_rows, precision=HIGHEST)
        if asymmetric:
            residual = w1 if outer_quantized else c1
            upd = upd - jnp.matmul(residual, p_rows, precision=HIGHEST)
        w = jnp.where(right, w - upd, w)
        w = jax.lax.dynamic_update_slice(w, w1, (0, i1))
        codes = jax.lax.dynamic_update_slice(codes, q1, (0, i1))
        return w, codes, scales, zeros, loss

    n_blocks = dp // block
    g_count = n_blocks if dynamic else grid.scale.shape[1]
    init = (w, jnp.zeros((o, dp), jnp.int32), jnp.zeros((o, g_count), w.dtype), jnp.zeros((o, g_count), w.dtype),
            jnp.zeros((), w.dtype))
    w, codes, scales, zeros, loss = jax.lax.fori_loop(0, n_blocks, block_body, init)
    return w, codes, Grid(scales, zeros), loss


def solve(w: jax.Array, h: jax.Array, *, bits: int, symmetric: bool = True, group_size: int | None = None,
          block_size: int = 128, damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
          clip_search: bool = False, d_cross: jax.Array | None = None, alpha: float = 0.25,
          outer_update: str = "quantized", shift_scale: float | None = None, grid: Grid | None = None,
          ratio: tuple[jax.Array, jax.Array] | None = None) -> Solution:
    """Round ``w: (o, d)`` column by column under the Hessian ``h: (d, d)``.

    GPTQ: ``d_cross`` None. GPTAQ: ``d_cross`` the cross term, ``alpha`` its weight, ``outer_update``
    ``"quantized"`` (official code) or ``"original"``. VLM-PTQ: also ``shift_scale`` (the factor of
    the target shift ``C``) and a ``grid`` fitted beforehand (``(o, G)`` per row or group).
    ``ratio``: a learned clipping ``(r_max, r_min)``, each ``(o,)`` or ``(o, 1)``, scaling every
    fitted range of the row (a transform method's weight clipping kept under GPTQ).

    ``group_size`` must divide ``d``; ``act_order`` sorts columns by decreasing ``H_ii`` and, with
    groups, needs the static grid (``static_groups`` or ``grid``)."""
    w = jnp.asarray(w)
    dtype = w.dtype if w.dtype == jnp.float64 else jnp.float32
    w, h = w.astype(dtype), jnp.asarray(h, dtype)
    o, d = w.shape
    if h.shape != (d, d) or (d_cross is not None and tuple(d_cross.shape) != (d, d)):
        raise SolverError(f"statistics of shape {h.shape} do not match a weight of {d} input columns")
    check_statistics(h, d_cross)
    if group_size is not None and d % group_size:
        raise SolverError(f"group size {group_size} does not divide the input width {d}; choose a --w-group-size "
                          "that divides every linear's input width, or none (one scale per output channel)")
    if outer_update not in ("quantized", "original"):
        raise SolverError(f"outer_update must be 'quantized' or 'original', got {outer_update!r}")
    static = static_groups or grid is not None
    if act_order and group_size is not None and not static:
        raise SolverError("act-order with weight groups needs static groups (the stored format keeps groups of "
                          "consecutive input channels): set static_groups")
    if ratio is not None:
        ratio = tuple(jnp.asarray(r, dtype).reshape(o, 1) for r in ratio)
    if grid is None and (static or group_size is None):
        grid = fit_static_grid(w, bits, symmetric, group_size, clip_search=clip_search,
                               ratio=ratio)  # before dead columns
    d_cross = None if d_cross is None else jnp.asarray(d_cross, dtype)
    w, h, d_cross = prepare(w, h, d_cross)
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(d)
    w, h = w[:, perm], h[perm][:, perm]
    if d_cross is not None:
        d_cross = d_cross[perm][:, perm]
    u, used = inverse_cholesky(h, damp)
    p = jnp.zeros_like(u) if d_cross is None else gptaq_correction(d_cross, u, alpha)
    c = (jnp.zeros((d,), dtype) if d_cross is None or shift_scale is None
         else target_shift(d_cross, u, shift_scale))
    dynamic = grid is None
    block = group_size if dynamic else block_size
    dp = -(-d // block) * block
    if dp != d:  # padded columns: zero weights on an identity Hessian, decoupled and exact
        w = jnp.pad(w, ((0, 0), (0, dp - d)))
        u = jax.scipy.linalg.block_diag(u, jnp.eye(dp - d, dtype=dtype))
        p = jnp.pad(p, ((0, dp - d), (0, dp - d)))
        c = jnp.pad(c, (0, dp - d))
    g = d if group_size is None else group_size
    gidx = jnp.pad(perm // g, (0, dp - d)) if not dynamic else jnp.arange(dp) // block
    placeholder = grid if grid is not None else Grid(jnp.zeros((o, 1), dtype), jnp.zeros((o, 1), dtype))
    wq, codes, fitted, loss = _column_loop(w, u, p, c, placeholder, gidx, ratio, bits=bits, symmetric=symmetric, block=block,
                                           dynamic=dynamic, clip_search=clip_search,
                                           outer_quantized=outer_update == "quantized", asymmetric=d_cross is not None)
    inv = jnp.argsort(perm)
    wq, codes = wq[:, :d][:, inv], codes[:, :d][:, inv]
    final = fitted if dynamic else grid
    return Solution(codes, Grid(final.scale.astype(dtype), final.zero.astype(dtype)), wq, loss, used)


def output_error(w: jax.Array, w_hat: jax.Array, h: jax.Array, d_cross: jax.Array | None = None, *,
                 w_cross: jax.Array | None = None) -> jax.Array:
    """``||W X~ - W^ X||^2 - ||W X~||^2`` from the statistics alone (``X~ X^T = D + H``; GPTQ: ``D``
    None, ``X~ = X``): ``tr(W^ H W^^T) - 2 tr(W (D + H) W^^T)``, comparable between candidates.
    ``w_cross``: ``W (D + H)`` ``(o, d)`` computed once for many candidates ``w_hat``."""
    if w_cross is None:
        w_cross = jnp.matmul(w, h if d_cross is None else h + d_cross, precision=HIGHEST)
    return _candidate_error(w_hat, h, w_cross)


@jax.jit
def _candidate_error(w_hat, h, w_cross):
    return jnp.sum(jnp.matmul(w_hat, h, precision=HIGHEST) * w_hat) - 2.0 * jnp.sum(w_cross * w_hat)


__all__ = ["Grid", "Solution", "SolverError", "check_statistics", "fit_grid", "fit_static_grid", "gptaq_correction", "inverse_cholesky",
           "output_error", "prepare", "solve", "target_shift"]
