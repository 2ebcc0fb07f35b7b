"""splitq_jax.pallas.quantize_pack: every implementation equals quant.quantize + pack_quantized.

One shared test base (``QuantizePackTests``) runs for ``implementation="xla"`` and ``"pallas"``
(the Pallas interpreter on CPU). Integer words and zero points are compared bit for bit, scales
exactly. Few cases, big d only with tiny M (interpret mode compiles each shape for ~1 s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax import packing, quant
from splitq_jax.pallas.quantize_pack import quantize_pack, quantize_pack_pallas
from splitq_jax.pallas.testing import (
    TRITON_CALL,
    export_cuda,
    extreme_rows,
    random_clip,
    random_rows,
    tie_rows,
)


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "word_dtype"))
def ref_quantize_pack(x, bits, symmetric, clip=None, word_dtype=jnp.uint32):
    """The reference under jit (as model code runs it; see test_fake_quant.ref_fake_quant)."""
    p = quant.quantize(x, bits, symmetric=symmetric, clip=clip)
    return packing.pack_quantized(p, bits, symmetric, x.shape, None, word_dtype)


# (rows shape, d, bits, symmetric, clip kind, word dtype, block_rows)
CASES = [
    ((7,), 896, 4, True, None, jnp.uint32, None),
    ((130,), 64, 4, False, "row", jnp.uint32, 16),  # 9 programs, last one ragged
    ((1,), 5120, 8, True, "row", jnp.uint32, None),
    ((1,), 3584, 4, False, "scalar", jnp.uint32, None),
    ((1,), 4096, 4, True, None, jnp.uint32, None),
    ((16,), 2048, 2, True, "row", jnp.uint8, 4),
    ((2, 3), 20, 4, True, None, jnp.uint32, 2),  # d not a multiple of 8: last word zero-padded
]


def assert_packed_equal(got: packing.PackedTensor, want: packing.PackedTensor):
    for field in ("bits", "shape", "symmetric", "group_size", "word_dtype"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.qvalue.dtype == want.qvalue.dtype and got.qvalue.shape == want.qvalue.shape
    np.testing.assert_array_equal(np.asarray(got.qvalue), np.asarray(want.qvalue))
    assert got.scale.dtype == jnp.float32 and got.scale.shape == want.scale.shape
    np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
    if want.zero_point is None:
        assert got.zero_point is None
    else:
        assert got.zero_point.dtype == want.zero_point.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(got.zero_point), np.asarray(want.zero_point))


class QuantizePackTests:
    implementation: str

    def qp(self, x, bits, **kw):
        return quantize_pack(x, bits, implementation=self.implementation, **kw)

    @pytest.mark.parametrize("rows,d,bits,symmetric,clip_kind,word_dtype,block_rows", CASES)
    def test_matches_reference(self, rows, d, bits, symmetric, clip_kind, word_dtype, block_rows):
        x, rng = random_rows(rows, d)
        clip = random_clip(clip_kind, rows, rng)
        got = self.qp(
            x, bits, symmetric=symmetric, clip=clip, word_dtype=word_dtype, block_rows=block_rows
        )
        want = ref_quantize_pack(x, bits, symmetric, clip, word_dtype)
        assert_packed_equal(got, want)

    def test_ties_round_half_to_even(self):
        sym, asym = tie_rows()
        for x, symmetric in ((sym, True), (asym, False)):
            got = self.qp(x, 4, symmetric=symmetric)
            assert_packed_equal(got, ref_quantize_pack(x, 4, symmetric))
        got = packing.unpack(self.qp(sym, 4).qvalue, 4, 16, signed=True)[0]
        np.testing.assert_array_equal(np.asarray(got[1:8]), [0, 2, 2, 0, -2, -2, 4])
        zero = self.qp(asym, 4, symmetric=False).zero_point
        np.testing.assert_array_equal(np.asarray(zero), [8])  # round(7.5) -> 8

    def test_bfloat16_special_rows_and_fallback(self):
        x, _ = random_rows((8,), 256, seed=1, dtype=jnp.bfloat16)
        x = x.at[3].set(0.0).at[5].set(-1.0)  # an all-zero row (scale -> SCALE_MIN), a constant row
        for symmetric in (True, False):
            got = self.qp(x, 4, symmetric=symmetric)
            assert_packed_equal(got, ref_quantize_pack(x, 4, symmetric))
        # 3-bit (10 values per uint32 word) has no kernel: it runs the reference
        y, _ = random_rows((4,), 40, seed=4)
        assert_packed_equal(self.qp(y, 3), ref_quantize_pack(y, 3, True))

    @pytest.mark.parametrize("bits", [2, 4, 8])
    def test_extreme_rows(self, bits):
        """Tiny, huge (up to the float32 maximum), zero and denormal rows equal the reference;
        the tiny copy of row 0 has row 0's codes."""
        x = extreme_rows(40, seed=1)
        clip = random_clip("row", (8,), np.random.default_rng(bits))
        for symmetric in (True, False):
            for c in (None, clip):
                got = self.qp(x, bits, symmetric=symmetric, clip=c)
                assert_packed_equal(got, ref_quantize_pack(x, bits, symmetric, c))
                assert bool(jnp.all(jnp.isfinite(packing.unpack_dequantize(got))))
            got = self.qp(x, bits, symmetric=symmetric)
            np.testing.assert_array_equal(np.asarray(got.qvalue[1]), np.asarray(got.qvalue[0]))

    def test_dequantize_matches_quant(self):
        x, rng = random_rows((5,), 128, seed=5)
        clip = random_clip("row", (5,), rng)
        for symmetric in (True, False):
            t = self.qp(x, 4, symmetric=symmetric, clip=clip)
            p = jax.jit(quant.quantize, static_argnames=("bits", "symmetric"))(
                x, 4, symmetric=symmetric, clip=clip
            )
            # the packed tensor dequantizes exactly like quant.dequantize ...
            np.testing.assert_array_equal(
                np.asarray(packing.unpack_dequantize(t)), np.asarray(quant.dequantize(p))
            )
            # ... which is what fake_quant computes (the same float32 operations)
            fq = jax.jit(quant.fake_quant, static_argnames=("bits", "symmetric"))(
                x, 4, symmetric=symmetric, clip=clip
            )
            np.testing.assert_array_equal(np.asarray(packing.unpack_dequantize(t)), np.asarray(fq))


class TestQuantizePackXla(QuantizePackTests):
    implementation = "xla"


class TestQuantizePackPallas(QuantizePackTests):
    implementation = "pallas"


@pytest.mark.parametrize(
    "m,d,bits,symmetric,clip,dtype,word_dtype",
    [
        (130, 3584, 4, True, True, jnp.float32, "uint32"),
        (7, 5120, 8, False, False, jnp.bfloat16, "uint32"),
        (1, 4096, 4, False, True, jnp.float32, "uint8"),
    ],
)
def test_cuda_lowering(m, d, bits, symmetric, clip, dtype, word_dtype):
    x = jax.ShapeDtypeStruct((m, d), dtype)
    s = jax.ShapeDtypeStruct((m, 1), jnp.float32) if clip else None

    def f(x_, a, b):
        return quantize_pack_pallas(
            x_, a, b, bits=bits, symmetric=symmetric, word_dtype=word_dtype, interpret=False
        )

    exp = export_cuda(f, x, s, s)
    text = exp.mlir_module()
    assert text.count(TRITON_CALL) == 1
    assert "div.rn.f32" in text
    words, scale, zero = exp.out_avals
    assert words.shape == (m, packing.packed_length(d, bits, word_dtype))
    assert words.dtype == jnp.dtype(word_dtype)
    assert scale.shape == zero.shape == (m, 1)


def test_triton_compiles_to_cubin(tmp_path):
    """Both kernels through Triton's own compiler to PTX and cubin for sm_90 (no GPU needed).

    Runs where the ``triton`` package is installed (it is not a CPU dependency of the project).
    """
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from splitq_jax.pallas.fake_quant import fake_quant_pallas
    from splitq_jax.pallas.testing import triton_ir

    x = jax.ShapeDtypeStruct((130, 3584), jnp.float32)
    s = jax.ShapeDtypeStruct((130, 1), jnp.float32)
    kernels = triton_ir(
        lambda x_, a, b: fake_quant_pallas(x_, a, b, bits=4, symmetric=True), x, s, s
    )
    kernels += triton_ir(
        lambda x_: quantize_pack_pallas(x_, None, None, bits=4, symmetric=False), x
    )
    assert len(kernels) == 2
    for i, text in enumerate(kernels):
        path = tmp_path / f"kernel{i}.ttir"
        path.write_text(text)
        compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32))
        assert "div.rn.f32" in compiled.asm["ptx"] and "div.full" not in compiled.asm["ptx"]
        assert len(compiled.asm["cubin"]) > 0
