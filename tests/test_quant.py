"""splitq_jax.quant against an independent numpy float32 implementation of spec Eq. 1.

The reference follows the op order of quant.py step by step, so results must agree bit for bit.
Two places where XLA's float results are not the textbook IEEE ones, mirrored here:

* ``amax / q_max`` (a division by a constant) is compiled as ``amax * fl(1 / q_max)``; it differs
  from the IEEE quotient by 1 ulp for about a third to a half of inputs. The reference multiplies
  by the float32 reciprocal too.
* ``exp`` inside the clipping sigmoid: XLA CPU's vectorised exp differs from libm by a few ulp on
  some inputs. The exact tests feed the reference the clip factors ``sigmoid(beta)`` as JAX
  computes them; a separate test bounds JAX's sigmoid against numpy's and checks the all-numpy
  path on logits where the two agree.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax import quant
from splitq_jax.quant import QuantError, aux_bits, dequantize, fake_quant, quantize

F32 = np.float32


# ----------------------------------------------------------------------------- reference


def np_sigmoid(z) -> np.ndarray:
    z = np.asarray(z, F32)
    return F32(1) / (F32(1) + np.exp(-z))


def _recip(q_max: int) -> np.float32:
    # XLA (eager and jit) rewrites division by a constant as multiplication by its float32
    # reciprocal, so quant.py's ``amax / q_max`` is ``amax * fl(1 / q_max)``, up to 1 ulp away
    # from the IEEE quotient. The reference does the same.
    return F32(1) / F32(q_max)


def ref_quant(x, bits, symmetric, group_size=None, clip_factors=None):
    """Eq. 1 in numpy float32. Returns (fake-quantized x, q (grouped), scale, zero).

    ``clip_factors``: ``(f_max, f_min)`` = sigmoid of the logits, shaped like the statistics
    without their trailing axis.
    """
    x = np.asarray(x, F32)
    xg = x
    if group_size is not None:
        xg = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    xmax = xg.max(axis=-1, keepdims=True)
    xmin = xg.min(axis=-1, keepdims=True)
    if clip_factors is not None:
        f_max, f_min = (np.asarray(f, F32)[..., None] for f in clip_factors)
        xmax = f_max * xmax
        xmin = f_min * xmin
    if symmetric:
        q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        amax = np.maximum(np.abs(xmin), np.abs(xmax))
        scale = np.maximum(amax * _recip(q_max), F32(1e-8))
        zero = np.zeros_like(scale)
    else:
        q_min, q_max = 0, 2**bits - 1
        xmax = np.maximum(xmax, F32(0))
        xmin = np.minimum(xmin, F32(0))
        scale = np.maximum((xmax - xmin) * _recip(q_max), F32(1e-8))
        zero = np.round(-xmin / scale)  # numpy rounds half to even
    q = np.clip(np.round(xg / scale) + zero, F32(q_min), F32(q_max))
    out = ((q - zero) * scale).reshape(x.shape)
    assert out.dtype == np.float32 and scale.dtype == np.float32
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
    for symmetric in (True, False):
        p = quantize(jnp.zeros((2, 8)), 4, symmetric=symmetric)
        np.testing.assert_array_equal(np.asarray(p.scale), np.full((2, 1), 1e-8, F32))
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
