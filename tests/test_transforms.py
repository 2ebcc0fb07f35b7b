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
