"""Uniform quantizers (spec Eq. 1) with learnable clipping and straight-through rounding.

One rule covers weights and activations: statistics are taken over the *last* axis, so

* a weight ``W`` of shape ``(d_out, d_in)`` is quantized per output channel (row), and
* an activation ``X`` of shape ``(..., tokens, d)`` is quantized per token (dynamically),

and ``group_size=g`` splits that last axis into groups of ``g`` with their own statistics.

``Q_b(x) = s * (clamp(round(x / s) + z, q_min, q_max) - z)``

* symmetric:  ``z = 0``, ``s = max|x| / (2^(b-1) - 1)``, integers in ``[-2^(b-1), 2^(b-1) - 1]``;
* asymmetric: ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``, integers in ``[0, 2^b - 1]``.

Learnable clipping follows FlatQuant: ``max <- sigmoid(beta_max) * max``, ``min <- sigmoid(beta_min) *
min``; weights carry one logit pair per output channel, activations one scalar pair per quantizer.
Rounding has a straight-through gradient; the scale is *not* detached, so gradients reach the
clipping logits and, through them and the data, the transforms.

Arithmetic. The quantizer computes in float32 whatever the input dtype (bfloat16 / float16 inputs
are widened exactly; the output is rounded to the input dtype once, at the end), and every step is
one correctly rounded float32 operation ``fl(.)``, so the integer codes of a row depend on that
row's values only: not on the batch shape, jit or eager execution, or how XLA fuses the graph.
With ``r = fl(1 / q_max)`` (a Python constant):

* ``s = max(fl(amax * r), SCALE_MIN)``, asymmetric ``s = max(fl(fl(max - min) * r), SCALE_MIN)``;
* division by the scale is multiplication by its correctly rounded reciprocal:
  ``x / s := fl(x * fl(1 / s))`` (codes ``round(x / s)``, zero point ``round(-min / s)``);
* ``Q(x) = fl((q - z) * s)``, saturated to the output dtype's largest finite value.

Why a reciprocal: XLA rewrites ``a / broadcast(s)`` into ``a * broadcast(1 / s)`` and ``a / c``
(constant ``c``) into ``a * fl(1 / c)`` in most compiled graphs but not in all (a ``(1, 1)``
operand, a width-1 row, a kernel computing IEEE quotients), so a written quotient has no single
value; the product with an explicit reciprocal is the same everywhere.

Extreme rows. XLA:CPU flushes float32 denormals to zero, as inputs and as results (measured:
``1e-40 * 2 == 0``, ``1e-40 / 2e-40`` is NaN); GPUs need not. The quantizer never produces a
denormal and a denormal value never changes a code, so results are the same either way, except in
one contrived case: a row whose (clipped) maximum or minimum is itself denormal while the other
statistic is not far above it (|stat| < 2^-102) can get a scale one ulp apart.

* ``SCALE_MIN = 2^-125`` keeps the scale normal and ``4 / s`` finite. A row with
  ``amax >= q_max * SCALE_MIN`` (about ``3e-36`` at 8 bits) keeps full relative accuracy: scaled
  by a power of two, a row keeps its codes and its scale scales exactly. Smaller values land at
  the floor: their codes are ``round(x / SCALE_MIN)``, the error at most ``SCALE_MIN / 2``; a
  denormal ``x`` always gives the code ``z`` (``|x| / SCALE_MIN < 1/2``), flushed or not.
* The reciprocal is formed as ``fl(4 / s)`` and applied as ``fl(fl(x * fl(4 / s)) / 4)``: a power
  of two moves only the exponent, so this equals ``fl(x * fl(1 / s))`` with unbounded exponent,
  while ``1 / s`` itself would be denormal (flushed: all-zero codes) for ``s > 2^126``.
* ``max - min`` overflows for rows spanning more than the float32 range; those rows take
  ``fl(fl(max / 2 - min / 2) * r) * 2``, exactly the unbounded-exponent value (halving is exact
  there).
* A grid point ``(q - z) * s`` may lie beyond the largest float (e.g. ``q_min * s`` near
  ``-amax * (q_max + 1) / q_max``); it saturates instead of becoming ``inf``.

Inputs are expected finite: ``inf`` / ``NaN`` propagate as usual.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax.errors import SplitqError

MIN_BITS, MAX_BITS = 2, 8
# Below this the branch factors and outlier groups are not quantized more aggressively (paper:
# "4-bit lower bound" for auxiliary components).
AUX_MIN_BITS = 4
CLIP_INIT = 4.0  # sigmoid(4) ~= 0.982: clipping starts almost off, as in FlatQuant.
# Scale floor: the smallest power of two whose reciprocal times 4 is finite in float32 (see the
# module docstring). Any larger floor coarsens tiny rows; 2^-126 (the smallest normal) would make
# fl(4 / s) overflow.
SCALE_MIN = np.float32(2.0**-125)
_F32_MAX = np.float32(np.finfo(np.float32).max)
# The reciprocal is taken as fl(4 / s) and the product scaled back by 1/4 (exact powers of two).
_RECIP_SHIFT = np.float32(4.0)
_RECIP_UNSHIFT = np.float32(0.25)
_QUOTIENT_BOUND = np.float32(2.0**24)  # see times_reciprocal


class QuantError(SplitqError):
    """Invalid quantizer configuration or input."""


def check_bits(bits: int | None) -> None:
    """Raise if ``bits`` is not ``None`` (quantizer off) or an integer in [2, 8]."""
    if bits is None:
        return
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantError(
            f"unsupported bit width {bits!r}: use an integer from {MIN_BITS} to {MAX_BITS}, "
            "or None to switch the quantizer off"
        )


def aux_bits(bits: int | None) -> int | None:
    """Bit width of auxiliary paths (outlier groups, low-rank branches): ``max(b, 4)``."""
    check_bits(bits)
    return None if bits is None else max(bits, AUX_MIN_BITS)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(q_min, q_max)`` of a ``bits``-wide quantizer."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: jax.Array) -> jax.Array:
    """Round to nearest (ties to even) with an identity gradient."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _grouped(x: jax.Array, group_size: int | None) -> jax.Array:
    if group_size is None:
        return x
    d = x.shape[-1]
    if group_size <= 0 or d % group_size:
        raise QuantError(
            f"group_size {group_size} does not divide the last axis ({d}); "
            "choose a divisor of the channel count or group_size=None"
        )
    return x.reshape(*x.shape[:-1], d // group_size, group_size)


def init_clip(shape: tuple[int, ...] = ()) -> dict[str, jax.Array]:
    """Clipping logits ``{"max": ..., "min": ...}`` of the given shape, all at ``CLIP_INIT``.

    Weights: ``shape=(d_out,)`` (or ``(d_out, n_groups)`` with groups); activations: ``()``.
    """
    full = jnp.full(shape, CLIP_INIT, jnp.float32)
    return {"max": full, "min": full}


class QParams(NamedTuple):
    """Integer representation: ``x ~= scale * (qvalue - zero_point)``.

    ``qvalue`` has the (grouped) shape of ``x``; ``scale`` and ``zero_point`` have a trailing
    singleton axis in place of the reduced one.
    """

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array


def _clip_logits(clip: dict[str, jax.Array] | None, stat_shape: tuple[int, ...], grouped: bool):
    """Check clipping logits against the statistics' shape; per-row logits are shared by the
    row's groups (they get a trailing group axis, instead of silently broadcasting over rows)."""
    if clip is None:
        return None
    out = {}
    for k in ("max", "min"):
        v = jnp.asarray(clip[k])
        if grouped and v.ndim == len(stat_shape) - 1 and v.ndim > 0:
            v = v[..., None]
        try:
            if jnp.broadcast_shapes(v.shape, stat_shape) != tuple(stat_shape):
                raise ValueError
        except ValueError:
            raise QuantError(
                f"clipping logits of shape {tuple(jnp.shape(clip[k]))} do not fit statistics of shape "
                f"{tuple(stat_shape)}: use one logit per row {tuple(stat_shape[:1])}, per group, or a scalar"
            ) from None
        out[k] = v
    return out


def inv_qmax(q_max: int) -> np.float32:
    """``fl(1 / q_max)``, the constant the scale's statistic is multiplied by."""
    return np.float32(1.0) / np.float32(q_max)


def scale_from_stats(xmax: jax.Array, xmin: jax.Array, bits: int, symmetric: bool) -> jax.Array:
    """float32 scale from the (clipped) statistics ``(..., 1)`` (see the module docstring).

    Asymmetric statistics must already contain zero (``xmax >= 0 >= xmin``). Plain ``jnp`` ops
    only, so the Pallas kernels call it as it is.
    """
    r = inv_qmax(qrange(bits, symmetric)[1])
    if symmetric:
        scale = jnp.maximum(jnp.abs(xmin), jnp.abs(xmax)) * r
    else:
        span = xmax - xmin
        # Only a span beyond the float32 range takes the halves; halving is exact there (both
        # statistics are then at least 2^103 in magnitude, far from denormals).
        halves = ((xmax * 0.5 - xmin * 0.5) * r) * 2.0
        scale = jnp.where(span <= _F32_MAX, span * r, halves)
    return jnp.maximum(scale, SCALE_MIN)


def times_reciprocal(v: jax.Array, recip4: jax.Array) -> jax.Array:
    """``v / s`` as the quantizer defines it, given ``recip4 = fl(4 / s)``.

    ``fl(fl(v * recip4) / 4)`` equals ``fl(v * fl(1 / s))`` with unbounded exponent for every
    ``s`` in ``[SCALE_MIN, largest float]`` (``fl(1 / s)`` itself would be denormal above
    ``2^126``). Two products, so XLA keeps both (it folds only constant factors together). The
    result is bounded to ``+-2^24``: beyond that it lies outside ``[q_min, q_max]`` after the
    shift by any zero point, so no code changes, but an infinite quotient (``|v| / s`` beyond the
    float range: data far outside a clipped-away range) never reaches a rounding or a gradient.
    """
    return jnp.clip((v * recip4) * _RECIP_UNSHIFT, -_QUOTIENT_BOUND, _QUOTIENT_BOUND)


def scale_recip4(scale: jax.Array, divide=jnp.divide) -> jax.Array:
    """``fl(4 / scale)``, the reciprocal :func:`times_reciprocal` takes (finite: ``scale >=
    SCALE_MIN``). ``divide``: an IEEE float32 division (the Pallas kernels pass their own)."""
    return divide(jnp.full_like(scale, _RECIP_SHIFT), scale)


def _qdq_parts(x, scale, lo, q_min: int, q_max: int, symmetric: bool):
    """Forward of :func:`_qdq` and the intermediates its derivative needs."""
    recip4 = scale_recip4(scale)
    t = times_reciprocal(x, recip4)  # x / s
    zt = jnp.zeros_like(scale) if symmetric else times_reciprocal(-lo, recip4)  # -min / s
    z = jnp.round(zt)
    a = jnp.round(t) + z
    q = jnp.clip(a, q_min, q_max)
    return (q - z) * scale, (t, zt, z, a, q)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _qdq(x, scale, lo, q_min: int, q_max: int, symmetric: bool):
    """``(clip(round(x / s) + z, q_min, q_max) - z) * s`` with ``z = round(-lo / s)`` (0 when
    symmetric), straight-through in both roundings.

    x: ``(..., g)`` float32; scale, lo: ``(..., 1)`` (``lo`` is the clipped minimum; ignored when
    symmetric). The derivative is written out, in the form that never multiplies a cotangent by
    the scale and then by its reciprocal: autodiff of the forward does exactly that, and for a
    row at the scale floor (an all-zero row, e.g. a low-rank branch whose gate starts at 0)
    ``g * SCALE_MIN`` is a denormal, which XLA:CPU flushes to zero, silencing the gradient.
    """
    return _qdq_parts(x, scale, lo, q_min, q_max, symmetric)[0]


@_qdq.defjvp
def _qdq_jvp(q_min, q_max, symmetric, primals, tangents):
    x, scale, lo = primals
    dx, ds, dlo = tangents
    out, (t, zt, z, a, q) = _qdq_parts(x, scale, lo, q_min, q_max, symmetric)
    # d clip / d a with JAX's own conventions (ties at the bounds included).
    _, c_prime = jax.jvp(lambda v: jnp.clip(v, q_min, q_max), (a,), (jnp.ones_like(a),))
    s_dt = dx - t * ds  # s * d(x / s)
    if symmetric:
        return out, c_prime * s_dt + q * ds
    s_dz = -dlo - zt * ds  # s * d(-lo / s), straight through the rounding of z
    return out, c_prime * (s_dt + s_dz) + (q - z) * ds - s_dz


def widen(x: jax.Array) -> jax.Array:
    """float32 ``x``, holding exactly ``x``'s values in ``x``'s dtype.

    For bfloat16 / float16 inputs the widened values are pinned to the input's precision with
    ``reduce_precision``: XLA may fold the convert pair after a narrow op that produced ``x``
    (``f32 -> bf16 -> f32``, "excess precision"), which would hand the quantizer unrounded values
    depending on how the graph was fused. (A no-op on values that are already narrow.)
    """
    dtype = jnp.dtype(x.dtype)
    x = x.astype(jnp.float32)
    if dtype == jnp.float32:
        return x
    fi = jnp.finfo(dtype)
    return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def saturate(v: jax.Array, dtype) -> jax.Array:
    """float32 ``v`` clamped to +-(largest finite value of ``dtype``): a grid point beyond the
    range (overflow rows only) becomes that value instead of ``inf`` when cast to ``dtype``.
    (``where`` rather than ``clip``: the gradient stays 1 at the bound itself.)"""
    m = np.float32(jnp.finfo(dtype).max)
    return jnp.where(v > m, m, jnp.where(v < -m, -m, v))


def _stats(x: jax.Array, clip: dict[str, jax.Array] | None, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """Clipped row maximum and minimum ``(..., 1)`` of float32 ``x`` (grouped); asymmetric
    statistics are widened to contain zero."""
    xmax = jnp.max(x, axis=-1, keepdims=True)
    xmin = jnp.min(x, axis=-1, keepdims=True)
    if clip is not None:
        # Logits broadcast against the statistics: (rows,) -> (rows, 1), (rows, g) -> (rows, g, 1).
        xmax = jax.nn.sigmoid(clip["max"]).astype(jnp.float32)[..., None] * xmax
        xmin = jax.nn.sigmoid(clip["min"]).astype(jnp.float32)[..., None] * xmin
    if not symmetric:
        # Keep zero inside the range so that exact zeros (masked channels, padding) stay exact.
        xmax = jnp.maximum(xmax, 0.0)
        xmin = jnp.minimum(xmin, 0.0)
    return xmax, xmin


def fake_quant(
    x: jax.Array,
    bits: int | None,
    *,
    symmetric: bool = True,
    clip: dict[str, jax.Array] | None = None,
    group_size: int | None = None,
) -> jax.Array:
    """Quantize-dequantize ``x`` along its last axis; differentiable (STE). ``bits=None``: identity.

    Args:
      x: ``(..., d)``; statistics per leading index (per token / per output channel).
      bits: 2..8, or None for no quantization.
      symmetric: symmetric (z = 0) or asymmetric quantizer.
      clip: optional clipping logits, broadcastable to ``x.shape[:-1]`` (per row) or
        ``x.shape[:-1] + (d // group_size,)`` with groups.
      group_size: optional group length along the last axis.
    Returns:
      array of ``x``'s shape and dtype.
    """
    check_bits(bits)
    if bits is None:
        return x
    xg = widen(_grouped(x, group_size))
    clip = _clip_logits(clip, xg.shape[:-1], group_size is not None)
    xmax, xmin = _stats(xg, clip, symmetric)
    scale = scale_from_stats(xmax, xmin, bits, symmetric)
    q_min, q_max = qrange(bits, symmetric)
    out = _qdq(xg, scale, xmin, q_min, q_max, bool(symmetric))
    return saturate(out, x.dtype).reshape(x.shape).astype(x.dtype)


def quantize(
    x: jax.Array,
    bits: int,
    *,
    symmetric: bool = True,
    clip: dict[str, jax.Array] | None = None,
    group_size: int | None = None,
) -> QParams:
    """Integer quantization (no gradient) with the same rule as :func:`fake_quant`.

    ``qvalue`` is int32 in ``qrange(bits, symmetric)`` with ``x``'s shape grouped as
    ``(..., n_groups, group_size)`` when ``group_size`` is set; ``scale`` is float32 and
    ``zero_point`` int32, both with a trailing singleton axis, whatever ``x``'s dtype.
    """
    check_bits(bits)
    if bits is None:
        raise QuantError("quantize() needs a bit width; bits=None means the tensor stays float")
    xg = widen(_grouped(x, group_size))
    clip = _clip_logits(clip, xg.shape[:-1], group_size is not None)
    xmax, xmin = _stats(xg, clip, symmetric)
    scale = scale_from_stats(xmax, xmin, bits, symmetric)
    q_min, q_max = qrange(bits, symmetric)
    recip4 = scale_recip4(scale)
    zero = jnp.zeros_like(scale) if symmetric else jnp.round(times_reciprocal(-xmin, recip4))
    q = jnp.clip(jnp.round(times_reciprocal(xg, recip4)) + zero, q_min, q_max)
    return QParams(q.astype(jnp.int32), jax.lax.stop_gradient(scale), zero.astype(jnp.int32))


def dequantize(p: QParams, shape: tuple[int, ...] | None = None, dtype=jnp.float32) -> jax.Array:
    """``scale * (qvalue - zero_point)`` in float32, saturated to ``dtype``'s range and cast to it,
    reshaped to ``shape`` (undoing grouping) if given: ``fake_quant``'s output, bit for bit."""
    x = (p.qvalue - p.zero_point).astype(jnp.float32) * p.scale.astype(jnp.float32)
    x = saturate(x, dtype)
    if shape is not None:
        x = x.reshape(shape)
    return x.astype(dtype)
