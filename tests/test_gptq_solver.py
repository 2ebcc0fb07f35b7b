"""The Hessian solvers (GPTQ, GPTAQ, VLM-PTQ's column loop) against numpy transcriptions, and
the identities that hold exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptq_reference import reference_blocked, reference_columns
from splitq_jax.methods.gptq import solver
from splitq_jax.quant import dequantize, quantize


def problem(o=6, d=32, n=96, seed=0, dead=()):
    """A weight and the statistics of correlated inputs ``x`` (the quantized path) and of their
    full-precision counterparts ``x_fp = x (I + E)``: upstream error that depends on the input."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(o, d))
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    x = rng.normal(size=(n, d)) @ mix * rng.uniform(0.3, 3.0, size=d)  # correlated, uneven channels
    x[:, list(dead)] = 0.0
    x_fp = x @ (np.eye(d) + 0.1 * rng.normal(size=(d, d)) / np.sqrt(d))
    h = x.T @ x
    d_cross = (x_fp - x).T @ x
    return w, h, d_cross


CASES = {
    "per-row sym": dict(bits=4),
    "per-row asym, clip rows": dict(bits=3, symmetric=False),
    "groups dynamic": dict(bits=3, symmetric=False, group_size=8),
    "groups static act-order": dict(bits=4, group_size=8, act_order=True, static_groups=True),
    "act-order per-row": dict(bits=2, symmetric=False, act_order=True),
    "gptaq": dict(bits=4, gptaq=True),
    "gptaq original outer": dict(bits=3, gptaq=True, outer_update="original"),
    "gptaq groups": dict(bits=4, symmetric=False, group_size=16, gptaq=True),
    "vlm-ptq shift": dict(bits=3, gptaq=True, shift_scale=0.25),
}


@pytest.mark.parametrize("name", list(CASES))
def test_solver_equals_numpy_blocked_reference(name):
    """float64 end to end: the JAX solver reproduces the published blocked algorithm's codes (its
    blocks of 8 columns over a width of 30: two full blocks and a ragged one)."""
    kw = dict(CASES[name])
    gptaq = kw.pop("gptaq", False)
    w, h, dc = problem(d=32 if kw.get("group_size") else 30, dead=(3,))
    with jax.enable_x64(True):
        sol = solver.solve(jnp.asarray(w), jnp.asarray(h), d_cross=jnp.asarray(dc) if gptaq else None,
                           block_size=8, **kw)
        got = np.asarray(sol.codes)
        assert sol.weight.dtype == jnp.float64
    want = reference_blocked(w, h, d_cross=dc if gptaq else None, block_size=8, **kw)
    np.testing.assert_array_equal(got, want)
    assert np.all(got[:, 3] == (0 if kw.get("symmetric", True) else got[:, 3]))  # the dead column


@pytest.mark.parametrize("gptaq", [False, True])
def test_lazy_blocks_equal_the_column_by_column_definition(gptaq):
    """Blocks only reorder the arithmetic: GPTQ's (and GPTAQ's with the original values in the
    outer update) codes equal the column-by-column OBS steps, whatever the block size."""
    w, h, dc = problem(d=24)
    kw = dict(bits=3, d_cross=dc if gptaq else None)
    want = reference_columns(w, h, **kw)
    with jax.enable_x64(True):
        for block in (1, 5, 8, 24):
            sol = solver.solve(jnp.asarray(w), jnp.asarray(h), block_size=block, outer_update="original",
                               **{**kw, "d_cross": None if dc is None or not gptaq else jnp.asarray(dc)})
            np.testing.assert_array_equal(np.asarray(sol.codes), want, err_msg=f"block {block}")


@pytest.mark.parametrize("group_size,symmetric", [(None, True), (None, False), (8, False)])
def test_diagonal_hessian_gives_round_to_nearest(group_size, symmetric):
    """With uncorrelated inputs (diagonal H) no error moves to another column: the codes, scales
    and zero points are exactly RTN's (splitq_jax.quant.quantize), in float32."""
    w, _, _ = problem(d=32)
    h = np.diag(np.random.default_rng(1).uniform(0.5, 2.0, 32))
    sol = solver.solve(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), bits=3, symmetric=symmetric,
                       group_size=group_size, block_size=8)
    rtn = quantize(jnp.asarray(w, jnp.float32), 3, symmetric=symmetric, group_size=group_size)
    np.testing.assert_array_equal(np.asarray(sol.codes), np.asarray(rtn.qvalue).reshape(w.shape))
    np.testing.assert_array_equal(np.asarray(sol.grid.scale).reshape(rtn.scale.shape), np.asarray(rtn.scale))
    np.testing.assert_array_equal(np.asarray(sol.grid.zero).reshape(rtn.scale.shape), np.asarray(rtn.zero_point))
    np.testing.assert_array_equal(np.asarray(sol.weight), np.asarray(dequantize(rtn, w.shape)))


def test_gptaq_without_cross_term_is_gptq():
    """D = 0 makes P = 0 and C = 0: GPTAQ and VLM-PTQ's loop are GPTQ exactly (float32)."""
    w, h, _ = problem()
    args = (jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32))
    base = solver.solve(*args, bits=3, block_size=8)
    for kw in (dict(d_cross=jnp.zeros((32, 32))), dict(d_cross=jnp.zeros((32, 32)), shift_scale=0.25)):
        other = solver.solve(*args, bits=3, block_size=8, **kw)
        np.testing.assert_array_equal(np.asarray(other.codes), np.asarray(base.codes))
        np.testing.assert_array_equal(np.asarray(other.weight), np.asarray(base.weight))


def test_gptq_lowers_output_error_and_gptaq_the_asymmetric_one():
    """On correlated inputs GPTQ's rounding has a much smaller output error than RTN's (and a
    larger weight error); GPTAQ's has the smaller error against the full-precision output."""
    w, h, dc = problem(o=16, d=32, n=256, seed=3)
    w32, h32, dc32 = (jnp.asarray(a, jnp.float32) for a in (w, h, dc))
    rtn = solver.solve(w32, jnp.diag(jnp.diag(h32)), bits=3)  # RTN: the diagonal Hessian
    gptq = solver.solve(w32, h32, bits=3)
    gptaq = solver.solve(w32, h32, bits=3, d_cross=dc32)

    def out_err(wh):  # ||(W - W^) X||^2 = tr((W - W^) H (W - W^)^T)
        e = np.asarray(wh, np.float64) - w
        return float(np.sum((e @ h) * e))

    e_rtn, e_gptq = out_err(rtn.weight), out_err(gptq.weight)
    assert e_gptq < 0.7 * e_rtn
    assert float(np.sum((gptq.weight - w) ** 2)) > float(np.sum((rtn.weight - w) ** 2))
    assert float(solver.output_error(w32, gptaq.weight, h32, dc32)) < float(solver.output_error(w32, gptq.weight, h32, dc32))


def test_damping_grows_until_the_factor_is_finite():
    h = jnp.diag(jnp.asarray([1.0, 1.0, 1.0, -0.02]))  # indefinite: 0.01 of the mean diagonal is not enough
    u, used = solver.inverse_cholesky(h, 0.01)
    assert used == pytest.approx(0.1)
    lam = 0.1 * float(jnp.mean(jnp.diag(h)))
    np.testing.assert_allclose(np.asarray(u.T @ u), np.linalg.inv(np.asarray(h) + lam * np.eye(4)), rtol=1e-5)
    with pytest.raises(solver.SolverError, match="not positive definite even with damping 0.01, 0.1, 1.0"):
        solver.inverse_cholesky(jnp.diag(jnp.asarray([1.0, 1.0, -5.0])), 0.01)


def test_bad_settings_are_refused():
    w, h, _ = problem()
    with pytest.raises(solver.SolverError, match="needs static groups"):
        solver.solve(w, h, bits=4, group_size=8, act_order=True)
    with pytest.raises(solver.SolverError, match="does not divide"):
        solver.solve(w, h, bits=4, group_size=7)
    with pytest.raises(solver.SolverError, match="do not match"):
        solver.solve(w, h[:8, :8], bits=4)


def test_unusable_statistics_are_refused():
    """An all-zero Hessian (no calibration token reached the layer) would zero every weight as
    "dead" columns; NaN statistics would fail the factorisation after every retry: both are refused
    up front with the cause."""
    w, h, dc = problem()
    with pytest.raises(solver.SolverError, match="all zero: no calibration token reached this layer"):
        solver.solve(w, np.zeros_like(h), bits=4)
    bad = h.copy()
    bad[2, 5] = np.nan
    with pytest.raises(solver.SolverError, match="Hessian holds NaN or inf"):
        solver.solve(w, bad, bits=4)
    bad = dc.copy()
    bad[0, 0] = np.inf
    with pytest.raises(solver.SolverError, match="cross term holds NaN or inf"):
        solver.solve(w, h, bits=4, d_cross=bad)


@pytest.mark.parametrize("symmetric,group_size", [(True, None), (False, None), (True, 8), (False, 8)])
def test_learned_clipping_on_an_identity_hessian_is_the_clipped_rtn(symmetric, group_size):
    """With ``H = I`` nothing moves, so GPTQ under a learned weight clipping (``ratio`` = sigmoid
    of the logits, per row, shared by the row's groups; static per-row grid or groups fitted as the
    loop reaches them) gives exactly the codes and scales of :func:`splitq_jax.quant.quantize` with
    those logits: the rule a transform method's fold uses when GPTQ is its weight solver."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(6, 32)), jnp.float32)
    clip = {"max": jnp.asarray(rng.normal(1.0, 1.0, size=6), jnp.float32),
            "min": jnp.asarray(rng.normal(1.0, 1.0, size=6), jnp.float32)}
    ratio = (jax.nn.sigmoid(clip["max"]), jax.nn.sigmoid(clip["min"]))
    sol = solver.solve(w, jnp.eye(32), bits=3, symmetric=symmetric, group_size=group_size, block_size=8,
                       damp=0.0, ratio=ratio)
    want = quantize(w, 3, symmetric=symmetric, clip=clip, group_size=group_size)
    np.testing.assert_array_equal(np.asarray(sol.codes), np.asarray(want.qvalue).reshape(6, 32))
    np.testing.assert_array_equal(np.asarray(sol.grid.scale), np.asarray(want.scale).reshape(6, -1))
    np.testing.assert_array_equal(np.asarray(sol.grid.zero), np.asarray(want.zero_point).reshape(6, -1))
    # and the clipping is in effect: codes at the ends of the range where the plain grid has fewer
    plain = solver.solve(w, jnp.eye(32), bits=3, symmetric=symmetric, group_size=group_size, block_size=8, damp=0.0)
    assert not np.array_equal(np.asarray(plain.codes), np.asarray(sol.codes))


def test_column_loop_program_does_not_grow_with_the_width():
    """The loops are XLA loops (scan / while): the traced program of width 2048 has as many equations as
    that of width 256 (its compile time does not grow with the number of columns)."""
    def size(d):
        w = jax.ShapeDtypeStruct((4, d), jnp.float32)
        m = jax.ShapeDtypeStruct((d, d), jnp.float32)
        grid = solver.Grid(jax.ShapeDtypeStruct((4, 1), jnp.float32), jax.ShapeDtypeStruct((4, 1), jnp.float32))
        jaxpr = jax.make_jaxpr(lambda *a: solver._column_loop(
            *a, bits=4, symmetric=True, block=128, dynamic=False, clip_search=False, outer_quantized=True,
            asymmetric=True))(w, m, m, jax.ShapeDtypeStruct((d,), jnp.float32), grid,
                              jax.ShapeDtypeStruct((d,), jnp.int32), None)
        text = str(jaxpr)
        assert "scan[" in text or "while[" in text
        return text.count(" = ")  # equations (lines wrap with the width of the type strings)

    assert size(256) == size(2048)


def test_modality_weighted_grid_prefers_the_important_channels():
    """VLM-PTQ's grid search weighs each input channel's squared error: with all the weight on a
    few channels, their error is no larger than under the unweighted min/max grid."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
    imp = jnp.zeros(64).at[:8].set(1.0)
    plain = solver.fit_grid(w, 3, True)
    weighted = solver.fit_grid(w, 3, True, importance=imp)

    def err(g):
        deq = (solver._codes(w, g.scale, g.zero, 3, True) - g.zero) * g.scale
        return np.sum(np.asarray((deq - w)[:, :8]) ** 2, axis=1)

    assert np.all(err(weighted) <= err(plain) + 1e-6)
    assert np.sum(err(weighted)) < np.sum(err(plain))
