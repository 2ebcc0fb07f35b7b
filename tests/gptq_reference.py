"""numpy (float64) transcriptions of the Hessian solvers, written from the equations of
``splitq_jax/methods/gptq/solver.py``'s docstring and the published algorithms, for the tests.

* :func:`reference_blocked`: GPTQ's ``fasterquant`` as published (blocks of ``B`` columns, the
  lazy update of the columns right of a block after it; GPTAQ's ``P`` term with the block's
  quantized or original values in that update; VLM-PTQ's shifted target);
* :func:`reference_columns`: the same OBS step applied to every remaining column at once, column
  by column (no blocks): the mathematical definition the lazy form reorders.
"""

from __future__ import annotations

import numpy as np


def grid(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scale and zero point ``(o, 1)`` of ``w (o, g)`` (min/max range; asymmetric ranges contain 0)."""
    xmax, xmin = w.max(-1, keepdims=True), w.min(-1, keepdims=True)
    if symmetric:
        s = np.maximum(np.abs(xmax), np.abs(xmin)) / (2 ** (bits - 1) - 1)
    else:
        xmax, xmin = np.maximum(xmax, 0), np.minimum(xmin, 0)
        s = (xmax - xmin) / (2**bits - 1)
    s = np.maximum(s, 2.0**-125)
    z = np.zeros_like(s) if symmetric else np.round(-xmin / s)
    return s, z


def codes(w, s, z, bits: int, symmetric: bool) -> np.ndarray:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    return np.clip(np.round(w / s) + z, lo, hi)


def _setup(w, h, d_cross, damp, act_order, alpha, shift):
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    d = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    dc = None if d_cross is None else np.array(d_cross, np.float64)
    if dc is not None:
        dc[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(d)
    w, h = w[:, perm], h[perm][:, perm]
    if dc is not None:
        dc = dc[perm][:, perm]
    h = h + damp * np.mean(np.diag(h)) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, U^T U = H^-1
    p = np.zeros((d, d)) if dc is None else alpha * np.triu(dc @ u.T, 1) @ u
    c = np.zeros(d) if dc is None or shift is None else shift * np.sum(dc * u, axis=1) * np.diag(u)
    return w, u, p, c, perm


def _static_grids(w, bits, symmetric, group_size):
    g = w.shape[1] if group_size is None else group_size
    return [grid(w[:, k:k + g], bits, symmetric) for k in range(0, w.shape[1], g)], g


def reference_blocked(w, h, *, bits, symmetric=True, group_size=None, block_size=128, damp=0.01, act_order=False,
                      static_groups=False, d_cross=None, alpha=0.25, outer_update="quantized", shift_scale=None):
    """Codes ``(o, d)`` of the published blocked algorithm. Dynamic groups are fitted when the
    loop reaches them, on blocks of ``group_size`` columns (the solver's choice; GPTQ's own with
    ``group_size == block_size``)."""
    grids, g = _static_grids(np.asarray(w, np.float64), bits, symmetric, group_size)
    dynamic = group_size is not None and not static_groups
    block = group_size if dynamic else block_size
    w, u, p, c, perm = _setup(w, h, d_cross, damp, act_order, alpha, shift_scale)
    o, d = w.shape
    q = np.zeros((o, d))
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, err, pre = w[:, i1:i2].copy(), np.zeros((o, i2 - i1)), np.zeros((o, i2 - i1))
        if dynamic:
            s, z = grid(w1, bits, symmetric)
        for j in range(i2 - i1):
            k = i1 + j
            if not dynamic:
                s, z = grids[perm[k] // g]
            col = w1[:, j].copy()
            qc = codes(col[:, None] * (1 + c[k]), s, z, bits, symmetric)
            qv = ((qc - z) * s)[:, 0]
            e = (col - qv) / u[k, k]
            w1[:, j:] -= np.outer(e, u[k, k:i2]) - np.outer(col, p[k, k:i2])
            w1[:, j] = qv
            q[:, k], err[:, j], pre[:, j] = qc[:, 0], e, col
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:] - (w1 if outer_update == "quantized" else pre) @ p[i1:i2, i2:]
    return q[:, np.argsort(perm)]


def reference_columns(w, h, *, bits, symmetric=True, group_size=None, damp=0.01, act_order=False, d_cross=None,
                      alpha=0.25, shift_scale=None):
    """Codes of the column-by-column OBS form (static grids; every remaining column updated at
    each step with the pre-rounding value in the ``P`` term)."""
    grids, g = _static_grids(np.asarray(w, np.float64), bits, symmetric, group_size)
    w, u, p, c, perm = _setup(w, h, d_cross, damp, act_order, alpha, shift_scale)
    q = np.zeros(w.shape)
    for k in range(w.shape[1]):
        s, z = grids[perm[k] // g]
        col = w[:, k].copy()
        qc = codes(col[:, None] * (1 + c[k]), s, z, bits, symmetric)
        qv = ((qc - z) * s)[:, 0]
        w[:, k:] -= np.outer((col - qv) / u[k, k], u[k, k:]) - np.outer(col, p[k, k:])
        w[:, k] = qv
        q[:, k] = qc[:, 0]
    return q[:, np.argsort(perm)]
