"""splitq_jax.pallas.fake_quant: every implementation equals splitq_jax.quant.fake_quant.

One shared test base (``FakeQuantTests``) runs for ``implementation="xla"`` and ``"pallas"`` (the
Pallas interpreter on CPU). Interpret mode compiles each new shape for about a second, so the
cases are few and chosen to cover the real divisibility classes (d = 896, 2048, 3584, 4096, 5120,
power of two or not; ragged row counts) with big d only at tiny M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax import quant
from splitq_jax.pallas import _common
from splitq_jax.pallas.fake_quant import fake_quant, fake_quant_pallas
from splitq_jax.pallas.testing import (
    TRITON_CALL,
    export_cuda,
    extreme_rows,
    random_clip,
    random_rows,
    tie_rows,
)

# (rows shape, d, bits, symmetric, clip kind, block_rows)
CASES = [
    ((7,), 896, 4, True, None, None),
    ((130,), 64, 3, False, "row", 16),  # 9 programs, last one ragged (2 rows)
    ((1,), 5120, 8, False, "scalar", None),
    ((16,), 2048, 4, True, "row", 4),
    ((1,), 3584, 2, True, "row", None),
    ((2, 3), 40, 4, False, "row", 2),  # leading batch axes, d < 64, ragged
]


# The reference under jit, as model code runs it. (Eager op-by-op execution of quant.py can differ:
# XLA rewrites ``amax / q_max`` as a multiplication by the reciprocal in compiled graphs, but an
# eager division of a tiny (1, 1) statistics array came out as the IEEE quotient, 1 ulp apart.)
ref_fake_quant = jax.jit(quant.fake_quant, static_argnames=("bits", "symmetric", "group_size"))


class FakeQuantTests:
    implementation: str

    def fq(self, x, bits, **kw):
        return fake_quant(x, bits, implementation=self.implementation, **kw)

    @pytest.mark.parametrize("rows,d,bits,symmetric,clip_kind,block_rows", CASES)
    def test_matches_reference(self, rows, d, bits, symmetric, clip_kind, block_rows):
        x, rng = random_rows(rows, d)
        clip = random_clip(clip_kind, rows, rng)
        got = self.fq(x, bits, symmetric=symmetric, clip=clip, block_rows=block_rows)
        want = ref_fake_quant(x, bits, symmetric=symmetric, clip=clip)
        assert got.shape == x.shape and got.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    def test_ties_round_half_to_even(self):
        sym, asym = tie_rows()
        for x, symmetric in ((sym, True), (asym, False)):
            got = self.fq(x, 4, symmetric=symmetric)
            want = ref_fake_quant(x, 4, symmetric=symmetric)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        # ties really are resolved to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -2.5 -> -2
        got = np.asarray(self.fq(sym, 4, symmetric=True))[0]
        np.testing.assert_array_equal(got[1:8], [0, 2, 2, -0.0, -2, -2, 4])

    def test_bfloat16_and_special_rows(self):
        x, _ = random_rows((8,), 256, seed=1, dtype=jnp.bfloat16)
        x = x.at[3].set(0.0).at[5].set(-1.0)  # an all-zero row (scale -> SCALE_MIN), a constant row
        for symmetric in (True, False):
            got = self.fq(x, 4, symmetric=symmetric)
            want = ref_fake_quant(x, 4, symmetric=symmetric)
            assert got.dtype == jnp.bfloat16
            np.testing.assert_array_equal(
                np.asarray(got, np.float32), np.asarray(want, np.float32)
            )

    @pytest.mark.parametrize("bits", [2, 3, 4, 8])
    def test_extreme_rows(self, bits):
        """Tiny, huge (up to the float32 maximum), zero and denormal rows: finite and equal to
        the reference, with and without clipping."""
        x = extreme_rows(40)
        clip = random_clip("row", (8,), np.random.default_rng(bits))
        for symmetric in (True, False):
            for c in (None, clip):
                got = self.fq(x, bits, symmetric=symmetric, clip=c)
                want = ref_fake_quant(x, bits, symmetric=symmetric, clip=c)
                assert bool(jnp.all(jnp.isfinite(got)))
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            # unclipped, the tiny copy of row 0 gives row 0's result scaled (a power of two: exactly)
            got = np.asarray(self.fq(x, bits, symmetric=symmetric))
            np.testing.assert_array_equal(got[1], got[0] * np.float32(2.0**-110))

    @pytest.mark.parametrize("symmetric,clip_kind", [(False, "row"), (True, "scalar")])
    def test_gradient_matches_reference(self, symmetric, clip_kind):
        rows, d = (5,), 96
        x, rng = random_rows(rows, d, seed=2)
        clip = random_clip(clip_kind, rows, rng)
        w = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), jnp.float32)

        def grads(fq):
            loss = lambda x_, c_: jnp.sum(fq(x_, 3, symmetric=symmetric, clip=c_) * w)
            return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, clip)

        got, want = grads(self.fq), grads(quant.fake_quant)
        # d/dx: STE, elementwise; d/dclip: sums over the row, where XLA's reduction order may
        # differ between two compiled graphs
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-7)
        for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
        # gradients reach the clipping logits
        assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(got[1]))

    def test_jit_groups_and_identity(self):
        x, _ = random_rows((4,), 64, seed=3)
        f = jax.jit(lambda x_: self.fq(x_, 4, symmetric=False))
        np.testing.assert_array_equal(
            np.asarray(f(x)), np.asarray(quant.fake_quant(x, 4, symmetric=False))
        )
        got = self.fq(x, 4, group_size=16)  # groups: always the XLA reference
        np.testing.assert_array_equal(
            np.asarray(got), np.asarray(quant.fake_quant(x, 4, group_size=16))
        )
        assert self.fq(x, None) is x


class TestFakeQuantXla(FakeQuantTests):
    implementation = "xla"


class TestFakeQuantPallas(FakeQuantTests):
    implementation = "pallas"


# ----------------------------------------------------------------------------- shared pieces


def test_round_half_even_matches_jnp_round():
    rng = np.random.default_rng(0)
    vals = np.concatenate(
        [
            rng.normal(0, 10, 20000),
            np.arange(-20, 20, 0.25),  # exact ties and quarters
            [0.49999997, -0.49999997, 0.5, -0.5, 1.5, -1.5, 2.5, 0.0, -0.0, 8388607.5, 8388609.0],
            [2.0**23 + 1, -(2.0**23) - 1, 1e30, -1e30, np.inf, -np.inf],
        ]
    ).astype(np.float32)
    got = np.asarray(jax.jit(_common.round_half_even)(vals))
    want = np.asarray(jnp.round(vals))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0.0 stays -0.0
    assert np.isnan(np.asarray(_common.round_half_even(jnp.float32(np.nan))))


def test_implementation_switch():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="unknown implementation"):
        fake_quant(x, 4, implementation="cuda")
    expected = "pallas" if jax.default_backend() == "gpu" else "xla"
    assert _common.resolve_implementation(None) == expected
    with pytest.raises(ValueError, match="power of two"):
        fake_quant(x, 4, implementation="pallas", block_rows=3)


# ----------------------------------------------------------------------------- CUDA lowering

@pytest.mark.parametrize(
    "m,d,symmetric,clip,dtype",
    [(130, 3584, True, True, jnp.float32), (7, 5120, False, False, jnp.bfloat16)],
)
def test_cuda_lowering(m, d, symmetric, clip, dtype):
    x = jax.ShapeDtypeStruct((m, d), dtype)
    s = jax.ShapeDtypeStruct((m, 1), jnp.float32) if clip else None

    def f(x_, a, b):
        return fake_quant_pallas(x_, a, b, bits=4, symmetric=symmetric, interpret=False)

    exp = export_cuda(f, x, s, s)
    text = exp.mlir_module()
    assert text.count(TRITON_CALL) == 1
    assert "div.rn.f32" in text  # IEEE division, not Triton's div.full.f32
    assert exp.out_avals[0].shape == (m, d)
