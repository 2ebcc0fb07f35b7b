import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax import transforms as tf


@pytest.mark.parametrize(
    "d", [1, 2, 6, 7, 10, 30, 64, 97, 896, 1966, 2048, 3584, 4096, 4098, 4864, 5120, 11008, 13824, 18944]
)
def test_kron_factors_every_width(d):
    n1, n2 = tf.kron_factors(d)
    assert n1 * n2 == d and 1 <= n1 <= n2
    # n1 is the largest divisor not above sqrt(d): no divisor lies strictly between n1 and sqrt(d).
    assert all(d % m for m in range(n1 + 1, math.isqrt(d) + 1))


def test_kron_factors_known_sizes():
    assert tf.kron_factors(2048) == (32, 64)
    assert tf.kron_factors(3584) == (56, 64)
    assert tf.kron_factors(896) == (28, 32)
    assert tf.kron_factors(97) == (1, 97)  # prime: one dense factor
    with pytest.raises(ValueError, match="positive"):
        tf.kron_factors(0)


def test_kron_apply_matches_numpy_kron():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(6, 6))
    x = rng.normal(size=(3, 5, 24))
    got = np.asarray(tf.kron_apply(jnp.asarray(x, jnp.float32), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    np.testing.assert_allclose(got, x @ np.kron(a, b), rtol=1e-5, atol=1e-5)


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = np.asarray(tf.random_orthogonal(jax.random.PRNGKey(3), 17), np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(17), atol=1e-5)
    q2 = np.asarray(tf.random_orthogonal(jax.random.PRNGKey(3), 17))
    np.testing.assert_array_equal(np.asarray(q, np.float32), q2)


def test_smooth_scale_formula():
    rng = np.random.default_rng(1)
    a = rng.uniform(0.1, 30, size=16).astype(np.float32)
    w = rng.uniform(0.01, 2, size=16).astype(np.float32)
    a[3] = 0.0  # a channel that never fires keeps c = 1
    got = np.asarray(tf.smooth_scale(jnp.asarray(a), jnp.asarray(w), 0.3))
    want = w ** 0.7 / np.maximum(a, 1e-5) ** 0.3
    want[3] = 1.0
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("d", [24, 30])  # 30 = 5 x 6, a width with d % 4 == 2
def test_transform_weight_inverse_is_exact_equivalence(d):
    """(X P)(P^-1 W^T) == X W^T: the transform changes nothing before quantization (Eq. 2)."""
    key = jax.random.PRNGKey(0)
    kx, kw, kc = jax.random.split(key, 3)
    c = jax.random.uniform(kc, (d,), minval=0.2, maxval=3.0)
    t = tf.init_kron(key, d, rotation="random", c=c)
    x = jax.random.normal(kx, (7, d))
    w = jax.random.normal(kw, (11, d))
    y = tf.apply_act(t, x) @ tf.apply_weight(t, w).T
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w.T), rtol=1e-4, atol=1e-4)
    # the implicit Kronecker application agrees with the explicit d x d matrix
    np.testing.assert_allclose(np.asarray(tf.apply_act(t, x)), np.asarray(x) @ tf.to_dense(t), rtol=1e-5, atol=1e-5)


def test_dense_outlier_transform_roundtrip():
    t = tf.init_dense(jax.random.PRNGKey(1), 5, rotation="random")
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 5))
    w = jax.random.normal(jax.random.PRNGKey(3), (6, 5))
    np.testing.assert_allclose(np.asarray(tf.apply_act(t, x) @ tf.apply_weight(t, w).T), np.asarray(x @ w.T),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(tf.init_dense(None, 3)["p"]), np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="identity"):
        tf.init_dense(None, 3, rotation="hadamard")


def test_init_kron_rejects_bad_diag():
    with pytest.raises(ValueError, match="shape"):
        tf.init_kron(jax.random.PRNGKey(0), 8, c=jnp.ones((7,)))


# ----------------------------------------------------------------------------- inverse accuracy


def _orthogonal(rng, n: int) -> np.ndarray:
    """A random dense orthogonal ``(n, n)`` matrix in float64: the orthonormal DCT-II basis with
    random row signs and random row and column permutations. Built without LAPACK: a numpy QR of
    a ~1000 x 1000 matrix starts OpenBLAS threads that compete with XLA's for the CPU (seconds per
    test on a small machine). A float32 LU inverse of it is as inaccurate as that of a Haar-random
    factor (measured at n = 983: 4.4e-5 vs 5.1e-5 in the identity below)."""
    k = np.arange(n)[:, None]
    c = np.cos(np.pi * (np.arange(n)[None, :] + 0.5) * k / n) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    c *= rng.choice([-1.0, 1.0], n)[:, None]
    return c[rng.permutation(n)][:, rng.permutation(n)]


def _identity_error(t, x, w) -> float:
    """max |(X P)(W P^-T)^T - X W^T| / max |X W^T|, against a float64 X W^T."""
    y = np.asarray(tf.apply_act(t, x) @ tf.apply_weight(t, w).T, np.float64)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("d", [997, 983, 1966, 24, 30, 896, 2048])
def test_identity_holds_at_every_width(d):
    """(X P)(W P^-T)^T == X W^T to 1e-5 relative for prime widths (one dense d x d factor), a
    prime times two (the gathered main path of a 2048-wide model: 1966 = 2 x 983) and composite
    widths, with a diagonal c and random orthogonal factors, and with factors moved off
    orthogonality (as training moves them; condition number ~2.5). A float32 LU inverse of a
    ~1000 x 1000 factor alone reaches only ~5e-5."""
    rng = np.random.default_rng(d)
    n1, n2 = tf.kron_factors(d)
    p1, p2 = _orthogonal(rng, n1), _orthogonal(rng, n2)
    t = {k: jnp.asarray(v, jnp.float32) for k, v in
         {"c": rng.uniform(0.2, 3.0, d), "p1": p1, "p2": p2}.items()}
    x = jnp.asarray(rng.normal(size=(16, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(32, d)), jnp.float32)
    assert _identity_error(t, x, w) <= 1e-5
    moved = {**t, "p2": jnp.asarray(p2 + 0.3 * rng.normal(size=(n2, n2)) / math.sqrt(n2), jnp.float32)}
    assert _identity_error(moved, x, w) <= 1e-5


@pytest.mark.parametrize("k", [97, 983])
def test_inverse_gradient_of_a_dense_factor(k):
    """d/dP of sum(G * (W P^-T)) = -P^-T G^T W P^-T (float64 reference), through jit: the
    training step differentiates through the inverse. P = diag(s) Q is not orthogonal (condition
    number 4) and has the exact inverse Q^T diag(1/s)."""
    rng = np.random.default_rng(k)
    q, s = _orthogonal(rng, k), rng.uniform(0.5, 2.0, k)
    p = s[:, None] * q
    w = rng.normal(size=(8, k))
    g = rng.normal(size=(8, k))
    w32, g32 = jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32)

    def loss(p_):
        return jnp.sum(g32 * tf.apply_weight({"p": p_}, w32))

    got = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(p, jnp.float32)), np.float64)
    pit = q / s[:, None]  # (Q^T diag(1/s))^T
    want = -(pit @ g.T) @ (w @ pit)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_inverse_gradient_of_kronecker_factors():
    """Gradients w.r.t. c, P1 and P2 at a prime-times-two width agree with central differences
    of the float64 loss along random directions."""
    d = 2 * 97
    rng = np.random.default_rng(5)
    t = {"c": jnp.asarray(rng.uniform(0.5, 2.0, d), jnp.float32),
         "p1": jnp.asarray(np.linalg.qr(rng.normal(size=(2, 2)))[0], jnp.float32),
         "p2": jnp.asarray(np.linalg.qr(rng.normal(size=(97, 97)))[0] + 0.2 * rng.normal(size=(97, 97)) / 10,
                           jnp.float32)}
    w = jnp.asarray(rng.normal(size=(6, d)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(6, d)), jnp.float32)
    grads = jax.jit(jax.grad(lambda t_: jnp.sum(g * tf.apply_weight(t_, w))))(t)

    def loss64(t_):
        m = tf.to_dense({k: np.asarray(v, np.float64) for k, v in t_.items()})
        return float(np.sum(np.asarray(g, np.float64) * (np.asarray(w, np.float64) @ np.linalg.inv(m).T)))

    for name in ("c", "p1", "p2"):
        v = rng.normal(size=t[name].shape)
        v /= np.linalg.norm(v)
        h = 1e-4
        plus = {**t, name: np.asarray(t[name], np.float64) + h * v}
        minus = {**t, name: np.asarray(t[name], np.float64) - h * v}
        fd = (loss64(plus) - loss64(minus)) / (2 * h)
        got = float(np.sum(np.asarray(grads[name], np.float64) * v))
        assert got == pytest.approx(fd, rel=1e-4, abs=1e-4), name
