"""splitq_jax.quant against an independent numpy implementation of spec Eq. 1.

The reference is written from the quantizer's definition (module docstring of
``splitq_jax.quant``): every step is one correctly rounded float32 operation ``fl``, division by the
scale is multiplication by ``fl(1 / s)``, the scale's statistic is multiplied by ``fl(1 / q_max)``,
the floor is ``SCALE_MIN`` and the output saturates at the largest float. It computes in float64
and rounds each result to a 24-bit significand with an *unbounded* exponent (:func:`fl`), so it
needs none of the implementation's tricks for huge or tiny rows, and results must agree bit for bit.

One place where XLA's float results are not the textbook IEEE ones: ``exp`` inside the clipping
sigmoid (XLA CPU's vectorised exp differs from libm by a few ulp on some inputs). The exact tests
feed the reference the clip factors ``sigmoid(beta)`` as JAX computes them; a separate test bounds
JAX's sigmoid against numpy's and checks the all-numpy path on logits where the two agree.

Denormals: XLA:CPU flushes float32 denormals to zero (inputs and results: ``1e-40 * 2 == 0``,
``1e-40 / 2e-40`` is NaN); GPUs need not. The tests use rows whose results do not depend on that:
the quantizer never produces a denormal, and a denormal input only ever meets the code ``z``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from splitq_jax import quant
from splitq_jax.quant import QuantError, aux_bits, dequantize, fake_quant, quantize

F32 = np.float32
F32_MAX = float(np.finfo(F32).max)


# ----------------------------------------------------------------------------- reference


def np_sigmoid(z) -> np.ndarray:
    z = np.asarray(z, F32)
    return F32(1) / (F32(1) + np.exp(-z))


def fl(v) -> np.ndarray:
    """float64 ``v`` rounded to a 24-bit significand (ties to even) with unbounded exponent.

    Applied to the float64 result of one ``+ - * /`` of such numbers, this is the correctly
    rounded float32 result (float64 has more than ``2 * 24 + 2`` bits, so the double rounding is
    innocuous), without float32's overflow or gradual underflow.
    """
    m, e = np.frexp(np.asarray(v, np.float64))
    return np.ldexp(np.round(m * 2.0**24) / 2.0**24, e)


def ref_quant(x, bits, symmetric, group_size=None, clip_factors=None, out_dtype=np.float32):
    """Eq. 1 as defined in ``splitq_jax.quant``. Returns (fake-quantized x in ``out_dtype``,
    q (grouped), scale, zero), the last three as float64 holding float32 values.

    ``x``: any float array (its values are used exactly). ``clip_factors``: ``(f_max, f_min)`` =
    sigmoid of the logits, shaped like the statistics without their trailing axis.
    """
    xg = np.asarray(np.asarray(x).astype(np.float64))
    shape = xg.shape
    if group_size is not None:
        xg = xg.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    xmax = xg.max(axis=-1, keepdims=True)
    xmin = xg.min(axis=-1, keepdims=True)
    if clip_factors is not None:
        f_max, f_min = (np.asarray(f, F32).astype(np.float64)[..., None] for f in clip_factors)
        xmax = fl(f_max * xmax)
        xmin = fl(f_min * xmin)
    q_min, q_max = quant.qrange(bits, symmetric)
    r = fl(1.0 / q_max)
    if symmetric:
        scale = fl(np.maximum(np.abs(xmin), np.abs(xmax)) * r)
    else:
        xmax, xmin = np.maximum(xmax, 0.0), np.minimum(xmin, 0.0)
        scale = fl(fl(xmax - xmin) * r)
    scale = np.maximum(scale, 2.0**-125)
    inv = fl(1.0 / scale)
    zero = np.zeros_like(scale) if symmetric else np.round(fl(-xmin * inv))  # half to even
    q = np.clip(np.round(fl(xg * inv)) + zero, q_min, q_max)
    out = fl((q - zero) * scale)
    big = float(np.finfo(out_dtype).max)
    out = np.clip(out, -big, big).reshape(shape).astype(out_dtype)
    return out, q, scale, zero


# ----------------------------------------------------------------------------- data


def _weights(rng):
    """(d_out, d_in) with awkward rows: all zero, all positive, all negative, an outlier."""
    w = rng.normal(size=(16, 64)).astype(F32)
    w[0] = 0.0
    w[1] = np.abs(w[1]) + 0.1
    w[2] = -np.abs(w[2]) - 0.1
    w[3, 5] = 25.0
    w[4, :32] = 0.0  # one zero group
    return w


def _acts(rng):
    """(B, N, d) activations with a heavy-tailed channel."""
    x = rng.standard_t(df=3, size=(2, 8, 64)).astype(F32)
    x[:, :, 7] *= 30.0
    x[1, 3] = 0.0
    return x


CASES = list(
    itertools.product(
        range(2, 9), [True, False], ["row", "token", "group_w", "group_a"], [False, True]
    )
)


def _case(kind, use_clip, rng):
    if kind in ("row", "group_w"):
        x = _weights(rng)
        gs = 32 if kind == "group_w" else None
        stat = (x.shape[0],) if gs is None else (x.shape[0], x.shape[1] // gs)
    else:
        x = _acts(rng)
        gs = 32 if kind == "group_a" else None
        stat = ()  # one scalar logit pair per activation quantizer
    clip = None
    if use_clip:
        clip = {
            "max": jnp.asarray(rng.normal(1.0, 2.0, size=stat).astype(F32)),
            "min": jnp.asarray(rng.normal(1.0, 2.0, size=stat).astype(F32)),
        }
    return x, gs, clip


def _factors(clip):
    if clip is None:
        return None
    return np.asarray(jax.nn.sigmoid(clip["max"])), np.asarray(jax.nn.sigmoid(clip["min"]))


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("bits,symmetric,kind,use_clip", CASES)
def test_matches_numpy_reference(bits, symmetric, kind, use_clip):
    rng = np.random.default_rng(1000 * bits + 10 * symmetric + use_clip)
    x, gs, clip = _case(kind, use_clip, rng)
    ref, q_ref, s_ref, z_ref = ref_quant(x, bits, symmetric, gs, _factors(clip))

    out = fake_quant(jnp.asarray(x), bits, symmetric=symmetric, clip=clip, group_size=gs)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out), ref)

    p = quantize(jnp.asarray(x), bits, symmetric=symmetric, clip=clip, group_size=gs)
    assert p.qvalue.dtype == jnp.int32 and p.zero_point.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(p.qvalue), q_ref.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(p.scale), s_ref)
    np.testing.assert_array_equal(np.asarray(p.zero_point), z_ref.astype(np.int32))
    q_min, q_max = quant.qrange(bits, symmetric)
    assert q_min <= int(p.qvalue.min()) and int(p.qvalue.max()) <= q_max
    np.testing.assert_array_equal(np.asarray(dequantize(p, x.shape)), ref)


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, True), (8, False)])
def test_jit_matches_reference(bits, symmetric):
    rng = np.random.default_rng(bits)
    x, gs, clip = _case("group_w", True, rng)
    ref, q_ref, _, _ = ref_quant(x, bits, symmetric, gs, _factors(clip))
    fq = jax.jit(lambda x, c: fake_quant(x, bits, symmetric=symmetric, clip=c, group_size=gs))
    np.testing.assert_array_equal(np.asarray(fq(jnp.asarray(x), clip)), ref)
    qz = jax.jit(lambda x, c: quantize(x, bits, symmetric=symmetric, clip=c, group_size=gs))
    q = qz(jnp.asarray(x), clip).qvalue
    np.testing.assert_array_equal(np.asarray(q), q_ref.astype(np.int32))


def test_round_half_to_even():
    # s = 7 / 7 = 1, so x / s hits the ties exactly.
    x = jnp.array([[7.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5]])
    expected = [[7.0, 0.0, 2.0, 2.0, -2.0, -0.0, 4.0]]
    np.testing.assert_array_equal(np.asarray(fake_quant(x, 4)), expected)
    # Asymmetric zero point on a tie: s = 15/15 = 1, z = round(7.5) = 8.
    p = quantize(jnp.array([[-7.5, 7.5]]), 4, symmetric=False)
    assert int(p.zero_point[0, 0]) == 8
    # round(-7.5) + 8 = 0; round(7.5) + 8 = 16 clips to 15
    np.testing.assert_array_equal(np.asarray(p.qvalue), [[0, 15]])


def test_asymmetric_keeps_zero_exact():
    x = jnp.array([[0.3, 1.0, 0.0, 2.2], [-3.0, -0.1, 0.0, -1.7]])
    p = quantize(x, 3, symmetric=False)
    np.testing.assert_array_equal(np.asarray(p.zero_point)[:, 0], [0, 7])
    out = fake_quant(x, 3, symmetric=False)
    assert float(out[0, 2]) == 0.0 and float(out[1, 2]) == 0.0


def test_zero_tensor_uses_scale_floor():
    assert quant.SCALE_MIN == F32(2.0**-125)
    for symmetric in (True, False):
        p = quantize(jnp.zeros((2, 8)), 4, symmetric=symmetric)
        np.testing.assert_array_equal(np.asarray(p.scale), np.full((2, 1), quant.SCALE_MIN, F32))
        np.testing.assert_array_equal(np.asarray(p.qvalue), 0)
        out = fake_quant(jnp.zeros((2, 8)), 4, symmetric=symmetric)
        np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_sigmoid_is_the_only_inexact_op():
    z = np.random.default_rng(0).normal(0.0, 4.0, size=4096).astype(F32)
    ulps = np.abs(np.asarray(jax.nn.sigmoid(z)).view(np.int32) - np_sigmoid(z).view(np.int32))
    assert ulps.max() <= 4
    # On logits where XLA's and numpy's sigmoid agree (the init value among them), the all-numpy
    # reference matches exactly.
    logits = np.array([quant.CLIP_INIT, 0.0, 1.0, 2.0], F32)
    np.testing.assert_array_equal(np.asarray(jax.nn.sigmoid(logits)), np_sigmoid(logits))
    x = _weights(np.random.default_rng(3))[:4]
    clip = {"max": jnp.asarray(logits), "min": jnp.asarray(logits[::-1].copy())}
    for symmetric in (True, False):
        ref = ref_quant(x, 4, symmetric, None, (np_sigmoid(logits), np_sigmoid(logits[::-1])))[0]
        out = fake_quant(jnp.asarray(x), 4, symmetric=symmetric, clip=clip)
        np.testing.assert_array_equal(np.asarray(out), ref)


def test_init_clip_starts_almost_off():
    c = quant.init_clip((3,))
    assert c["max"].shape == (3,) and float(c["max"][0]) == 4.0 and float(c["min"][0]) == 4.0
    x = jnp.asarray(_weights(np.random.default_rng(5))[:3])
    f = float(jax.nn.sigmoid(4.0))
    ref = ref_quant(np.asarray(x), 4, True, None, (np.full(3, f, F32), np.full(3, f, F32)))[0]
    np.testing.assert_array_equal(np.asarray(fake_quant(x, 4, clip=c)), ref)


# ----------------------------------------------------------------------------- extreme rows

KINDS = list(itertools.product(range(2, 9), [True, False]))


def _rows(rng, n: int = 6, d: int = 48) -> np.ndarray:
    """(n, d) ordinary rows, max |x| in [0.5, 64): heavy tails, an all-positive row, a constant
    negative row, an exact zero."""
    x = np.clip(rng.standard_t(df=3, size=(n, d)), -60.0, 60.0).astype(F32)
    x[1] = np.abs(x[1]) + 0.5
    x[2] = -0.75
    x[3, 7] = 0.0
    return x


def _assert_matches_ref(x, bits, symmetric, clip=None, clip_factors=None):
    """fake_quant, quantize and dequantize of float32 ``x`` (rows) equal the reference exactly."""
    ref, q_ref, s_ref, z_ref = ref_quant(x, bits, symmetric, clip_factors=clip_factors)
    out = np.asarray(fake_quant(jnp.asarray(x), bits, symmetric=symmetric, clip=clip))
    np.testing.assert_array_equal(out, ref)
    p = quantize(jnp.asarray(x), bits, symmetric=symmetric, clip=clip)
    np.testing.assert_array_equal(np.asarray(p.qvalue), q_ref.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(p.scale), s_ref)
    np.testing.assert_array_equal(np.asarray(p.zero_point), z_ref.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(dequantize(p)), ref)
    return out, p


@pytest.mark.parametrize("bits,symmetric", KINDS)
def test_tiny_rows_keep_relative_accuracy(bits, symmetric):
    """A row scaled by 2^-k (down to max|x| ~ 2^-111 ~ 4e-34) quantizes exactly like the row
    itself: same codes and zero points, scale and output scaled by 2^-k (a power of two moves
    only the exponent; every result stays a normal float)."""
    x = _rows(np.random.default_rng(bits + 10 * symmetric))
    out, p = _assert_matches_ref(x, bits, symmetric)
    for k in (40, 100, 112):
        f = F32(2.0**-k)
        out_k, p_k = _assert_matches_ref(x * f, bits, symmetric)
        np.testing.assert_array_equal(np.asarray(p_k.qvalue), np.asarray(p.qvalue))
        np.testing.assert_array_equal(np.asarray(p_k.zero_point), np.asarray(p.zero_point))
        np.testing.assert_array_equal(np.asarray(p_k.scale), np.asarray(p.scale) * f)
        np.testing.assert_array_equal(out_k, out * f)
    # The reported case: a row of values around 1e-12 is no longer rounded to zero.
    row = np.linspace(-1e-12, 3e-12, 16, dtype=F32)[None]
    out, p = _assert_matches_ref(row, bits, symmetric)
    step = float(np.asarray(p.scale)[0, 0])
    stat = 3e-12 if symmetric else float(np.ptp(row))  # amax, or max - min
    assert step == pytest.approx(stat / quant.qrange(bits, symmetric)[1], rel=1e-6)
    assert np.all(np.abs(out.astype(np.float64) - row) <= 0.5001 * step)
    assert np.any(out != 0.0)


@pytest.mark.parametrize("bits,symmetric", KINDS)
def test_rows_below_the_floor(bits, symmetric):
    """Rows whose scale would fall below SCALE_MIN = 2^-125: the scale is the floor, values
    round to multiples of it (error <= SCALE_MIN / 2), denormals to the zero point (exact zeros
    out), whether or not the platform flushes denormals."""
    smin = float(quant.SCALE_MIN)
    # below q_max * SCALE_MIN for every width (2-bit symmetric: q_max = 1)
    row = np.array([[2.2e-38, -1.9e-38, 1.2e-38, 5.9e-39, -1e-40, 1e-45, 0.0, 1.1754942e-38]], F32)
    out, p = _assert_matches_ref(row, bits, symmetric)  # max and min are normal numbers
    assert np.all(np.abs(out.astype(np.float64) - row) <= smin / 2)
    np.testing.assert_array_equal(np.asarray(p.scale), np.full((1, 1), smin, F32))
    denormal = np.array([[1e-40, -5.9e-39, 1e-45, 0.0, -1.1754942e-38, 1.1754942e-38]], F32)
    p = quantize(jnp.asarray(denormal), bits, symmetric=symmetric)
    np.testing.assert_array_equal(np.asarray(p.scale), np.full((1, 1), smin, F32))
    zero = np.broadcast_to(np.asarray(p.zero_point), denormal.shape)
    np.testing.assert_array_equal(np.asarray(p.qvalue), zero)
    out = np.asarray(fake_quant(jnp.asarray(denormal), bits, symmetric=symmetric))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("bits,symmetric", KINDS)
def test_huge_rows_are_finite_and_exact(bits, symmetric):
    """Rows up to the float32 maximum: finite, equal to the reference, within half a step of x,
    and (scaled by 2^124) with the codes of the unscaled row."""
    rng = np.random.default_rng(100 + bits + 10 * symmetric)
    x = _rows(rng)
    f = F32(2.0**122)  # max|x| < 64 = 2^6: the scaled rows stay below 2^128
    big = np.concatenate(
        [
            x * f,
            np.array([[F32_MAX, F32_MAX / 2, -F32_MAX / 3, 1.0, -0.9 * F32_MAX] + [0.0] * 43,
                      [F32_MAX, -F32_MAX] * 24,
                      [-F32_MAX] + [1e38] * 46 + [0.0]], F32),
        ]
    )
    out, p = _assert_matches_ref(big, bits, symmetric)
    assert np.all(np.isfinite(out))
    step = np.asarray(p.scale, np.float64)
    err = np.abs(out.astype(np.float64) - big)
    assert np.all(err <= 0.5001 * step + 2.0**-22 * np.abs(big))
    # the scaled ordinary rows keep their codes (the 2-3-bit symmetric rows used to be all zero,
    # the asymmetric ones NaN)
    p_x = quantize(jnp.asarray(x), bits, symmetric=symmetric)
    n = x.shape[0]
    np.testing.assert_array_equal(np.asarray(p.qvalue)[:n], np.asarray(p_x.qvalue))
    np.testing.assert_array_equal(np.asarray(p.zero_point)[:n], np.asarray(p_x.zero_point))
    np.testing.assert_array_equal(np.asarray(p.scale)[:n], np.asarray(p_x.scale) * f)


def test_huge_rows_in_narrow_dtypes_saturate():
    """bfloat16 / float16 rows at their maximum: grid points beyond it saturate instead of inf."""
    for dtype in (jnp.bfloat16, jnp.float16):
        m = float(jnp.finfo(dtype).max)
        x = jnp.asarray([[m, -m, 0.5 * m, 1.0], [-m, 0.3 * m, 0.0, m]], dtype)
        for bits, symmetric in KINDS:
            ref = ref_quant(np.asarray(x, np.float64), bits, symmetric, out_dtype=np.dtype(dtype))[0]
            out = fake_quant(x, bits, symmetric=symmetric)
            assert out.dtype == dtype and bool(jnp.all(jnp.isfinite(out)))
            np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
            p = quantize(x, bits, symmetric=symmetric)
            assert p.scale.dtype == jnp.float32
            back = np.asarray(dequantize(p, dtype=dtype), np.float32)
            np.testing.assert_array_equal(back, np.asarray(ref, np.float32))


def test_bfloat16_matches_reference():
    """Narrow inputs are quantized in float32 and rounded to their dtype once, at the end."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(_acts(rng)).astype(jnp.bfloat16)
    clip = {"max": jnp.asarray(rng.normal(1.0, 2.0, size=(8,)), jnp.float32),
            "min": jnp.asarray(rng.normal(1.0, 2.0, size=(8,)), jnp.float32)}
    for bits, symmetric in ((3, True), (4, False), (8, True)):
        for c in (None, clip):
            ref, q_ref, s_ref, _ = ref_quant(np.asarray(x, np.float32), bits, symmetric,
                                             clip_factors=_factors(c), out_dtype=ml_dtypes.bfloat16)
            out = fake_quant(x, bits, symmetric=symmetric, clip=c)
            assert out.dtype == jnp.bfloat16
            np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
            p = quantize(x, bits, symmetric=symmetric, clip=c)
            np.testing.assert_array_equal(np.asarray(p.qvalue), q_ref.astype(np.int32))
            np.testing.assert_array_equal(np.asarray(p.scale), s_ref)


def test_narrow_input_computed_inside_jit():
    """A bfloat16 input computed inside the same jitted graph is quantized from its bfloat16
    values, as when it comes materialized (XLA may otherwise skip rounding the producer's float32
    result to bfloat16: excess precision)."""
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.normal(size=(64, 96)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(96, 96)), jnp.bfloat16)
    for symmetric in (True, False):
        want = quantize(a @ b, 4, symmetric=symmetric)  # eager: the product is stored as bf16
        got = jax.jit(lambda a_, b_: quantize(a_ @ b_, 4, symmetric=symmetric))(a, b)
        np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
        np.testing.assert_array_equal(np.asarray(got.qvalue), np.asarray(want.qvalue))
        want = fake_quant(a @ b, 4, symmetric=symmetric)
        got = jax.jit(lambda a_, b_: fake_quant(a_ @ b_, 4, symmetric=symmetric))(a, b)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _tie_rows(rng, n: int, d: int, bits: int, symmetric: bool) -> np.ndarray:
    """(n, d) rows whose values sit on or next to the rounding ties of their own grid: ``fl((k +
    1/2) s)`` and its float32 neighbours, where a quotient computed any other way than the
    definition (IEEE ``x / s``, or ``x * fl(1 / s)`` of a differently rounded ``s``) may round
    to the other side."""
    x = _rows(rng, n, d).astype(np.float64)
    _, _, s, z = ref_quant(x, bits, symmetric)
    q_min, q_max = quant.qrange(bits, symmetric)
    k = rng.integers(q_min, q_max, size=(n, d - 8)) - z  # grid steps inside the row's range
    ties = (k + 0.5) * s
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    ties = np.clip(ties, lo, hi).astype(F32)  # inside the range: the statistics do not change
    near = np.stack([ties, np.nextafter(ties, F32(np.inf)), np.nextafter(ties, F32(-np.inf))])
    pick = rng.integers(0, 3, size=ties.shape)
    x = x.astype(F32)
    x[:, 8:] = np.take_along_axis(near, pick[None], 0)[0]
    x[:, 8:] = np.clip(x[:, 8:], lo.astype(F32), hi.astype(F32))
    return x


@pytest.mark.parametrize(
    "bits,symmetric", [(2, True), (3, False), (4, True), (4, False), (8, True), (8, False)]
)
def test_codes_do_not_depend_on_batch_or_jit(bits, symmetric):
    """The codes of a row are the same quantized alone (1-D), in a batch of 1, 3 or 64 rows,
    jitted or eager, and equal the reference's."""
    x = _tie_rows(np.random.default_rng(bits * 7 + symmetric), 64, 40, bits, symmetric)
    ref, q_ref, s_ref, z_ref = ref_quant(x, bits, symmetric)
    q_ref = q_ref.astype(np.int32)

    def eager(v):
        return quantize(v, bits, symmetric=symmetric)

    jitted = jax.jit(eager)
    fq_jit = jax.jit(lambda v: fake_quant(v, bits, symmetric=symmetric))
    for f in (eager, jitted):
        for n in (1, 3, 64):
            for start in range(0, 64 - n + 1, max(n, 9)):
                p = f(jnp.asarray(x[start:start + n]))
                np.testing.assert_array_equal(np.asarray(p.qvalue), q_ref[start:start + n])
                np.testing.assert_array_equal(np.asarray(p.scale), s_ref[start:start + n])
                np.testing.assert_array_equal(np.asarray(p.zero_point), z_ref[start:start + n])
        for i in (0, 5, 63):  # a single row without a batch axis
            np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x[i])).qvalue), q_ref[i])
    np.testing.assert_array_equal(np.asarray(fq_jit(jnp.asarray(x))), ref)
    eager_fq = fake_quant(jnp.asarray(x[:3]), bits, symmetric=symmetric)
    np.testing.assert_array_equal(np.asarray(eager_fq), ref[:3])
    # rows of width 1: statistics and values coincide in shape (no broadcast in the quotient)
    col = x[:, :1]
    q_col = ref_quant(col, bits, symmetric)[1].astype(np.int32)
    np.testing.assert_array_equal(np.asarray(eager(jnp.asarray(col)).qvalue), q_col)
    np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(col)).qvalue), q_col)


# ----------------------------------------------------------------------------- gradients


def test_straight_through_gradient_unclipped():
    x = jnp.array([[-1.0, 0.3, 0.5, 0.9, 2.0]])
    for symmetric in (True, False):
        jac = jax.jit(jax.jacrev(lambda v: fake_quant(v, 4, symmetric=symmetric)))(x).reshape(5, 5)
        # Inside the range d out_i / d x_i = 1 (rounding is transparent); the extremes also get 1
        # in total because their outputs reproduce them (plus the scale's path).
        np.testing.assert_allclose(np.diag(np.asarray(jac)), 1.0, rtol=0, atol=1e-6)


def test_straight_through_gradient_clipped():
    # 4-bit symmetric, clip max logit 0 (factor 0.5), min logit 20 (factor 1.0 in float32):
    # max <- 1.0, min = -0.9, s = 1/7. Values 1.5 and 2.0 land beyond q_max = 7.
    x = jnp.array([[-0.9, 0.3, 0.5, 0.9, 1.5, 2.0]])
    clip = {"max": jnp.array([0.0]), "min": jnp.array([20.0])}
    f = lambda v: fake_quant(v, 4, clip=clip)
    out = np.asarray(f(x))[0]
    np.testing.assert_allclose(out[4:], 1.0, rtol=0, atol=1e-6)  # both saturate at s * q_max
    jac = np.asarray(jax.jit(jax.jacrev(f))(x)).reshape(6, 6)
    d = np.diag(jac)
    np.testing.assert_allclose(d[:4], 1.0, rtol=0, atol=1e-6)  # in range: identity
    assert d[4] == 0.0  # clipped and not a statistic: no gradient
    # The clipped maximum still moves the scale: out = s * 7 = sigmoid(0) * x_max.
    np.testing.assert_allclose(d[5], 0.5, rtol=0, atol=1e-6)
    np.testing.assert_allclose(jac[:, 4], 0.0)


def test_gradient_reaches_clip_logits():
    rng = np.random.default_rng(7)
    w = jnp.asarray(_weights(rng)[5:13])  # 8 ordinary rows
    x = jnp.asarray(_acts(rng))

    def loss_w(c):
        return jnp.sum((fake_quant(w, 3, symmetric=False, clip=c) - w) ** 2)

    def loss_x(c):
        return jnp.sum((fake_quant(x, 4, clip=c) - x) ** 2)

    g = jax.jit(jax.grad(loss_w))(quant.init_clip((8,)))
    for k in ("max", "min"):
        assert g[k].shape == (8,)
        assert np.all(np.isfinite(np.asarray(g[k]))) and np.all(np.asarray(g[k]) != 0.0)
    g = jax.jit(jax.grad(loss_x))(quant.init_clip())
    for k in ("max", "min"):
        assert g[k].shape == () and np.isfinite(float(g[k]))
    assert float(g["max"]) != 0.0 or float(g["min"]) != 0.0
    # Grouped weights: one logit pair per (row, group).
    def loss_g(c):
        return jnp.sum((fake_quant(w, 4, clip=c, group_size=32) - w) ** 2)

    gw = jax.jit(jax.grad(loss_g))(quant.init_clip((8, 2)))
    assert gw["max"].shape == (8, 2) and np.all(np.isfinite(np.asarray(gw["max"])))
    assert np.any(np.asarray(gw["max"]) != 0.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradients_finite_on_extreme_rows(symmetric):
    """Zero, tiny, huge and clipped-away rows keep finite gradients (w.r.t. x and the clipping
    logits), and a row scaled by 2^-100 has the same input gradient as the row itself (the
    quantizer is homogeneous under powers of two)."""
    rng = np.random.default_rng(11 + symmetric)
    base = _rows(rng, 4, 32)
    x = np.concatenate([
        base,
        base * F32(2.0**-100),  # tiny
        base * F32(2.0**122),  # huge
        np.zeros((1, 32), F32),  # scale at the floor
        np.full((1, 32), 1e-40, F32),  # denormal
    ])
    n = x.shape[0]
    logits = rng.uniform(-1.0, 5.0, size=n).astype(F32)
    logits[-5] = -120.0  # sigmoid == 0: the whole (huge) row lies beyond its clipped range
    clip = {"max": jnp.asarray(logits), "min": jnp.asarray(logits[::-1].copy())}
    g = rng.normal(size=x.shape).astype(F32)
    g[4:8] = g[:4]  # same output cotangent for the tiny copies
    g = jnp.asarray(g)

    def loss(v, c):
        return jnp.sum(fake_quant(v, 3, symmetric=symmetric, clip=c) * g)

    gx, gc = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), clip)
    gx = np.asarray(gx)
    assert np.all(np.isfinite(gx))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in gc.values())
    # d out / dx is scale-invariant: tiny rows (with the same logits) get the ordinary rows'
    # gradient, up to the rounding of cotangent sums
    same = {"max": clip["max"].at[4:8].set(clip["max"][:4]), "min": clip["min"].at[4:8].set(clip["min"][:4])}
    gx2 = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x), same))
    np.testing.assert_allclose(gx2[4:8], gx2[:4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_row_passes_its_gradient(symmetric):
    """A row at the scale floor (all zeros: a low-rank branch whose gate starts at 0) keeps its
    straight-through gradient for cotangents of any size. Autodiff of the plain formula
    multiplies the cotangent by SCALE_MIN (a denormal, flushed to zero on XLA:CPU) and silenced
    it. The gradient of a zero row does not depend on the floor's value, so the reference is the
    plain formula with a floor of 1, where nothing underflows. (Symmetric: the identity; asymmetric:
    0 is the grid's lowest point, where JAX's clip convention and the statistics share it out.)"""
    g = jnp.asarray(np.geomspace(1e-12, 1.0, 16, dtype=F32)[None])
    zeros = jnp.zeros((1, 16), jnp.float32)
    for clip in (None, {"max": jnp.array([3.0]), "min": jnp.array([2.0])}):
        gx = jax.jit(jax.grad(lambda v: jnp.sum(fake_quant(v, 4, symmetric=symmetric, clip=clip) * g)))(zeros)
        want = jax.jit(jax.grad(lambda v: jnp.sum(_plain_fake_quant(v, 4, symmetric, clip, floor=1.0) * g)))(zeros)
        assert np.any(np.asarray(gx) != 0.0)
        np.testing.assert_allclose(np.asarray(gx), np.asarray(want), rtol=1e-6, atol=0)
        if symmetric:
            np.testing.assert_array_equal(np.asarray(gx), np.asarray(g))


def _plain_fake_quant(x, bits, symmetric, clip, floor=None):
    """The quantizer as a plain expression (autodiff differentiates it as written): the
    reference for the written-out derivative of ``quant._qdq``; ``floor`` replaces the scale floor."""
    xmax, xmin = quant._stats(x, clip, symmetric)
    s = quant.scale_from_stats(xmax, xmin, bits, symmetric)
    if floor is not None:
        s = jnp.maximum(s, floor)
    q_min, q_max = quant.qrange(bits, symmetric)
    z = 0.0 if symmetric else quant.round_ste(-xmin / s)
    q = jnp.clip(quant.round_ste(x / s) + z, q_min, q_max)
    return (q - z) * s


@pytest.mark.parametrize("symmetric", [True, False])
def test_written_derivative_equals_autodiff_on_ordinary_rows(symmetric):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(6, 24)).astype(F32) * 3.0)
    clip = {"max": jnp.asarray(rng.uniform(0.5, 5.0, 6).astype(F32)),
            "min": jnp.asarray(rng.uniform(0.5, 5.0, 6).astype(F32))}
    g = jnp.asarray(rng.normal(size=(6, 24)).astype(F32))

    def grads(f):
        return jax.jit(jax.grad(lambda v, c: jnp.sum(f(v, c) * g), argnums=(0, 1)))(x, clip)

    got = grads(lambda v, c: fake_quant(v, 3, symmetric=symmetric, clip=c))
    want = grads(lambda v, c: _plain_fake_quant(v, 3, symmetric, c))
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    for k in ("max", "min"):
        np.testing.assert_allclose(np.asarray(got[1][k]), np.asarray(want[1][k]), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- configuration


def test_bits_none_is_identity():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)).astype(F32))
    assert fake_quant(x, None) is x
    clip = quant.init_clip((3,))
    assert fake_quant(x, None, symmetric=False, clip=clip, group_size=4) is x
    assert aux_bits(None) is None
    with pytest.raises(QuantError):
        quantize(x, None)


@pytest.mark.parametrize("bits", range(2, 9))
def test_aux_bits(bits):
    assert aux_bits(bits) == max(bits, 4)


@pytest.mark.parametrize("bad", [1, 9, 0, -4, 3.5, True, "4"])
def test_bad_bits_raise(bad):
    x = jnp.ones((2, 8))
    for fn in (
        lambda: fake_quant(x, bad),
        lambda: quantize(x, bad),
        lambda: aux_bits(bad),
        lambda: quant.check_bits(bad),
    ):
        with pytest.raises(QuantError, match=repr(bad).replace(".", r"\.")):
            fn()


@pytest.mark.parametrize("gs", [5, 0, -32, 48])
def test_bad_group_size_raises(gs):
    x = jnp.ones((2, 64))
    with pytest.raises(QuantError, match=str(gs)):
        fake_quant(x, 4, group_size=gs)
    with pytest.raises(QuantError, match=str(gs)):
        quantize(x, 4, group_size=gs)


def test_qrange():
    assert quant.qrange(4, True) == (-8, 7)
    assert quant.qrange(4, False) == (0, 15)
    assert quant.qrange(2, True) == (-2, 1)
    assert quant.qrange(8, False) == (0, 255)
