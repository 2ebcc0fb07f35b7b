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
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS, MAX_BITS = 2, 8
# Below this the branch factors and outlier groups are not quantized more aggressively (paper:
# "4-bit lower bound" for auxiliary components).
AUX_MIN_BITS = 4
CLIP_INIT = 4.0  # sigmoid(4) ~= 0.982: clipping starts almost off, as in FlatQuant.
_EPS = 1e-8


class QuantError(ValueError):
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


def _params(
    x: jax.Array,
    bits: int,
    symmetric: bool,
    clip: dict[str, jax.Array] | None,
    round_fn,
) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point of the last axis of ``x`` (already grouped)."""
    xmax = jnp.max(x, axis=-1, keepdims=True)
    xmin = jnp.min(x, axis=-1, keepdims=True)
    if clip is not None:
        # Logits broadcast against the statistics: (rows,) -> (rows, 1), (rows, g) -> (rows, g, 1).
        xmax = jax.nn.sigmoid(clip["max"])[..., None] * xmax
        xmin = jax.nn.sigmoid(clip["min"])[..., None] * xmin
    q_min, q_max = qrange(bits, symmetric)
    if symmetric:
        amax = jnp.maximum(jnp.abs(xmin), jnp.abs(xmax))
        scale = jnp.maximum(amax / q_max, _EPS)
        zero = jnp.zeros_like(scale)
    else:
        # Keep zero inside the range so that exact zeros (masked channels, padding) stay exact.
        xmax = jnp.maximum(xmax, 0.0)
        xmin = jnp.minimum(xmin, 0.0)
        scale = jnp.maximum((xmax - xmin) / q_max, _EPS)
        zero = round_fn(-xmin / scale)
    return scale, zero


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
    xg = _grouped(x, group_size)
    clip = _clip_logits(clip, xg.shape[:-1], group_size is not None)
    scale, zero = _params(xg, bits, symmetric, clip, round_ste)
    q_min, q_max = qrange(bits, symmetric)
    q = jnp.clip(round_ste(xg / scale) + zero, q_min, q_max)
    return ((q - zero) * scale).reshape(x.shape).astype(x.dtype)


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
    ``(..., n_groups, group_size)`` when ``group_size`` is set.
    """
    check_bits(bits)
    if bits is None:
        raise QuantError("quantize() needs a bit width; bits=None means the tensor stays float")
    xg = _grouped(x, group_size)
    clip = _clip_logits(clip, xg.shape[:-1], group_size is not None)
    scale, zero = _params(xg, bits, symmetric, clip, jnp.round)
    q_min, q_max = qrange(bits, symmetric)
    q = jnp.clip(jnp.round(xg / scale) + zero, q_min, q_max)
    return QParams(q.astype(jnp.int32), scale, zero.astype(jnp.int32))


def dequantize(p: QParams, shape: tuple[int, ...] | None = None, dtype=jnp.float32) -> jax.Array:
    """``scale * (qvalue - zero_point)``, reshaped to ``shape`` (undoing grouping) if given."""
    x = (p.qvalue - p.zero_point).astype(jnp.float32) * p.scale.astype(jnp.float32)
    if shape is not None:
        x = x.reshape(shape)
    return x.astype(dtype)
