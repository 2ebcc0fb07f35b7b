"""Learnable equivalent transforms (spec Eq. 2, 13, 14).

Main path: ``P = diag(c) . (P1 kron P2)`` (FlatQuant), applied as
``X P = reshape(P1^T . reshape(X diag(c), n1 x n2) . P2)`` without ever forming the d x d product.
The weight side uses ``P^{-1} W^T``; in the row orientation used throughout (``W: (d_out, d)``) that is
``W P^{-T} = W diag(1/c) (P1^{-T} kron P2^{-T})``, the same Kronecker application with inverted
factors. Inverses are computed in float32 from the small factors, never from the d x d matrix, and
refined by one Newton-Schulz step (a prime width has one dense d x d factor; see ``_refined_inv``).

Outlier groups (Eq. 13, 14) use small dense ``k x k`` transforms.

Transform pytree: ``{"c": (d,), "p1": (n1, n1), "p2": (n2, n2)}``; a dense one: ``{"p": (k, k)}``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def kron_factors(d: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1 * n2 == d``, ``n1 <= n2`` and ``n1`` the largest divisor <= sqrt(d).

    Terminates for every positive width (a prime width gives ``(1, d)``: one dense factor).
    """
    if d <= 0:
        raise ValueError(f"transform width must be positive, got {d}")
    for n1 in range(math.isqrt(d), 0, -1):
        if d % n1 == 0:
            return n1, d // n1
    raise AssertionError("unreachable: 1 divides every integer")


def kron_apply(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``x @ (a kron b)`` over the last axis without forming the Kronecker product.

    Args:
      x: ``(..., n1 * n2)``; a: ``(n1, n1)``; b: ``(n2, n2)``.
    Returns:
      ``(..., n1 * n2)``.
    """
    n1, n2 = a.shape[0], b.shape[0]
    xr = x.reshape(*x.shape[:-1], n1, n2)
    # (x (a kron b))[p*n2 + q] = sum_ij x[i, j] a[i, p] b[j, q]
    y = jnp.einsum("...ij,ip,jq->...pq", xr, a, b)
    return y.reshape(x.shape)


def random_orthogonal(key: jax.Array, n: int) -> jax.Array:
    """A Haar-random ``(n, n)`` orthogonal matrix (QR of a Gaussian with the sign fix)."""
    g = jax.random.normal(key, (n, n), jnp.float32)
    q, r = jnp.linalg.qr(g)
    return q * jnp.sign(jnp.diagonal(r))[None, :]


def smooth_scale(
    act_absmax: jax.Array, weight_absmax: jax.Array, alpha: float, eps: float = 1e-5
) -> jax.Array:
    """SmoothQuant-style channel scale ``c_j = max|W_:,j|^(1-alpha) / max|X_:,j|^alpha``.

    ``X diag(c)`` shrinks channels whose activations are large relative to their weights. Channels
    that never activate (or have zero weights) get ``c = 1``.
    """
    a = jnp.maximum(act_absmax.astype(jnp.float32), eps)
    w = jnp.maximum(weight_absmax.astype(jnp.float32), eps)
    c = w ** (1.0 - alpha) / a**alpha
    dead = (act_absmax <= eps) | (weight_absmax <= eps)
    return jnp.where(dead, 1.0, c)


def init_kron(
    key: jax.Array,
    d: int,
    *,
    rotation: str = "random",
    c: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Initial Kronecker transform of width ``d``.

    Args:
      rotation: ``"random"`` (random orthogonal factors, FlatQuant) or ``"identity"``.
      c: initial diagonal (e.g. :func:`smooth_scale`); ones if None.
    """
    n1, n2 = kron_factors(d)
    if rotation == "random":
        k1, k2 = jax.random.split(key)
        p1, p2 = random_orthogonal(k1, n1), random_orthogonal(k2, n2)
    elif rotation == "identity":
        p1, p2 = jnp.eye(n1, dtype=jnp.float32), jnp.eye(n2, dtype=jnp.float32)
    else:
        raise ValueError(f"unknown rotation init {rotation!r}: use 'random' or 'identity'")
    if c is None:
        c = jnp.ones((d,), jnp.float32)
    if c.shape != (d,):
        raise ValueError(f"diagonal scale has shape {c.shape}, expected ({d},)")
    return {"c": c.astype(jnp.float32), "p1": p1, "p2": p2}


def init_dense(key: jax.Array, k: int, *, rotation: str = "identity") -> dict[str, jax.Array]:
    """Initial dense ``k x k`` transform for an outlier group (identity or random orthogonal)."""
    if rotation == "identity":
        return {"p": jnp.eye(k, dtype=jnp.float32)}
    if rotation == "random":
        return {"p": random_orthogonal(key, k)}
    raise ValueError(f"unknown outlier transform init {rotation!r}: use 'identity' or 'random'")


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    # Full float32 products: a GPU's default (TF32 / bf16 passes) would undo the refinement.
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


@jax.custom_jvp
def _refined_inv(m: jax.Array) -> jax.Array:
    """Inverse of a float32 ``(n, n)`` matrix: the LU inverse plus one Newton-Schulz step.

    ``jnp.linalg.inv`` in float32 loses accuracy with ``n`` (about ``n * eps``: 5e-5 relative in
    ``(X P)(W P^-T)^T`` for a dense 997 x 997 or 983 x 983 factor, i.e. a prime width or 1966 =
    2 x 983, against ~2e-6 for the small factors of composite widths). The step
    ``X <- X + X (I - M X)`` squares the residual (``I - M X' = (I - M X)^2``), which brings the
    inverse down to the round-off of float32 products, as good as a float64 inverse rounded to
    float32 (measured). It is kept only where it converges, ``||I - M X||_inf < 1``; a nearly
    singular factor keeps the LU inverse. Cost: two ``n^3`` products, once per training step.
    """
    x = jnp.linalg.inv(m)
    residual = jnp.eye(m.shape[-1], dtype=m.dtype) - _matmul(m, x)
    converges = jnp.max(jnp.sum(jnp.abs(residual), axis=-1)) < 1.0
    return jnp.where(converges, x + _matmul(x, residual), x)


@_refined_inv.defjvp
def _refined_inv_jvp(primals, tangents):
    # d(M^-1) = -M^-1 dM M^-1, from the refined inverse (and without differentiating LU).
    (m,), (dm,) = primals, tangents
    x = _refined_inv(m)
    return x, -_matmul(_matmul(x, dm), x)


def _inv(m: jax.Array) -> jax.Array:
    """float32 inverse of a square factor (see :func:`_refined_inv`); differentiable."""
    return _refined_inv(m.astype(jnp.float32))


def apply_act(t: dict[str, jax.Array] | None, x: jax.Array) -> jax.Array:
    """``X P`` for a Kronecker (``{"c","p1","p2"}``) or dense (``{"p"}``) transform; None = identity."""
    if t is None:
        return x
    if "p" in t:
        return x @ t["p"].astype(x.dtype)
    if "c" in t:  # absent once folded into the preceding norm
        x = x * t["c"].astype(x.dtype)
    return kron_apply(x, t["p1"].astype(x.dtype), t["p2"].astype(x.dtype))


def inverse(t: dict[str, jax.Array] | None) -> dict[str, jax.Array] | None:
    """The weight-side operator of ``t``: ``{"c_inv", "a", "b"}`` with ``W P^-T = (W diag(1/c)) (a kron b)``
    (Kronecker), or ``{"a"}`` with ``W P^-T = W a`` (dense). Compute once per step, apply to many weights."""
    if t is None:
        return None
    if "p" in t:
        return {"a": _inv(t["p"]).T}
    inv = {"a": _inv(t["p1"]).T, "b": _inv(t["p2"]).T}
    if "c" in t:
        inv["c_inv"] = 1.0 / t["c"].astype(jnp.float32)
    return inv


def apply_inverse(inv: dict[str, jax.Array] | None, w: jax.Array) -> jax.Array:
    """``W P^-T`` for rows of ``W: (rows, d)`` given :func:`inverse` of ``P``, in float32."""
    if inv is None:
        return w
    w = w.astype(jnp.float32)
    if "b" not in inv:
        return w @ inv["a"]
    if "c_inv" in inv:
        w = w * inv["c_inv"]
    return kron_apply(w, inv["a"], inv["b"])


def apply_weight(t: dict[str, jax.Array] | None, w: jax.Array) -> jax.Array:
    """``W P^{-T}`` (rows of ``W: (d_out, d)``), i.e. the transpose of ``P^{-1} W^T``."""
    return apply_inverse(inverse(t), w)


def to_dense(t: dict[str, jax.Array]) -> np.ndarray:
    """The full ``d x d`` matrix ``P`` (tests and debugging only)."""
    if "p" in t:
        return np.asarray(t["p"])
    return np.diag(np.asarray(t["c"])) @ np.kron(np.asarray(t["p1"]), np.asarray(t["p2"]))
