"""splitq_jax.pallas.split_gemm: the packed split GEMM against integer truth, the dequantized float
product, the XLA reference and the fake-quant forward of a folded group.

One shared test base (``SplitGemmTests``) runs for ``implementation="xla"`` and ``"pallas"`` (the
Pallas interpreter on CPU). Integer parts are checked bit for bit: with unit scales and an
integer bias every float operation of the epilogue is exact (|y| < 2^24), so the output must equal
the int64 numpy sum of the terms. With random scales the output matches the float64 product of
the dequantized operands to 1e-5 relative (XLA and Triton both contract ``a * b + c`` into FMAs,
each where it sees fit, so the epilogues agree to rounding, not bit for bit). Few cases, big K
only with tiny M and narrow N (interpret mode compiles each shape for about a second).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax.methods import transform
from splitq_jax import packing, quant
from splitq_jax.quantized import fold
from splitq_jax.methods.splitq import split_linear as sl
from splitq_jax import transforms as tf
from splitq_jax.config import method_config
from splitq_jax.pallas.split_gemm import (
    GemmWeight,
    QuantizedActs,
    folded_weights,
    gemm_weight,
    quantize_acts,
    quantized_acts,
    split_gemm,
    split_gemm_xla,
)
from splitq_jax.pallas.testing import TRITON_CALL, export_cuda

TERMS = ("cws", "mac", "text", "vision")
# Auxiliary term sizes: CWS rank 72 (2% of 3584), MAC rank 108 (3%), 72 text / 72 vision outlier
# channels (2% each); smaller in the ragged case.
AUX_K = {"cws": 72, "mac": 108, "text": 72, "vision": 72}


# ----------------------------------------------------------------------------- test operands


def rand_acts(rng, rows, k, bits, symmetric, unit_scale):
    """Random int8 activation operands of ``bits``-wide values (asymmetric: shifted domain)."""
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = rng.integers(lo, hi, (*rows, k))
    scale = np.ones(rows) if unit_scale else rng.uniform(0.01, 0.2, rows)
    zero = None if symmetric else jnp.asarray(rng.integers(lo, hi, rows), jnp.int32)
    return QuantizedActs(jnp.asarray(q, jnp.int8), jnp.asarray(scale, jnp.float32), zero)


def rand_weight(rng, n, k, bits, word_dtype, unit_scale):
    q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (n, k))
    scale = np.ones(n) if unit_scale else rng.uniform(0.001, 0.05, n)
    words = packing.pack(jnp.asarray(q, jnp.int32), bits, word_dtype, signed=True)
    t = packing.PackedTensor(
        words, jnp.asarray(scale, jnp.float32), None, bits, (n, k), True, None,
        np.dtype(word_dtype).name,
    )
    return gemm_weight(t)


def operands(case, seed, unit_scale):
    """``(x, w, terms, text_mask, bias)`` of one case."""
    rows, k, n, w_bits, word_dtype, a_bits, a_sym, term_names, aux_k, _ = case
    rng = np.random.default_rng(seed)
    x = rand_acts(rng, rows, k, a_bits, a_sym, unit_scale)
    w = rand_weight(rng, n, k, w_bits, word_dtype, unit_scale)
    aux_a = max(a_bits, 4)
    terms = {}
    for i, name in enumerate(term_names):
        # alternate word types and symmetry so that every combination meets the kernel
        a = rand_acts(rng, rows, aux_k[name], aux_a, a_sym if i % 2 else not a_sym, unit_scale)
        b = rand_weight(rng, n, aux_k[name], 4, ("uint8", "uint32")[i % 2], unit_scale)
        terms[name] = (a, b)
    mask = jnp.asarray(rng.random(rows) < 0.6)
    bias = np.round(rng.normal(0, 50, n)) if unit_scale else rng.normal(0, 1, n)
    return x, w, terms, mask, jnp.asarray(bias, jnp.float32)


def dequant_acts(a: QuantizedActs) -> np.ndarray:
    q = np.asarray(a.qvalue, np.int64)
    if a.zero_point is not None:
        q = q - np.asarray(a.zero_point, np.int64)[..., None]
    return q


def weight_ints(b: GemmWeight) -> np.ndarray:
    return np.asarray(packing.unpack(b.qvalue, b.bits, b.k, b.word_dtype, signed=True), np.int64)


def truth(x, w, terms, mask, bias, exact: bool) -> np.ndarray:
    """int64 (``exact``, scales ignored) or float64 sum of the terms, from the raw integers."""
    def term(a, b):
        acc = dequant_acts(a) @ weight_ints(b).T
        if exact:
            return acc
        return acc * np.asarray(a.scale, np.float64)[..., None] * np.asarray(b.scale, np.float64)

    y = term(x, w)
    for name, (a, b) in terms.items():
        t = term(a, b)
        y = y + (np.where(np.asarray(mask)[..., None], t, 0) if name == "mac" else t)
    return y + (np.asarray(bias, np.int64) if exact else np.asarray(bias, np.float64))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# (rows, K, N, w bits, word dtype, a bits, a symmetric, terms, aux K, (block_m, block_n))
CASES = [
    ((1,), 896, 896, 4, "uint8", 4, True, TERMS, AUX_K, None),  # decode, every term, 56 programs
    ((16,), 2048, 40, 4, "uint32", 8, False, ("cws", "text"), AUX_K, None),  # ragged N tile
    ((130,), 256, 48, 4, "uint8", 4, False, TERMS, dict(cws=7, mac=11, text=40, vision=3),
     (32, 16)),  # 5 x 3 programs, ragged M, N and every auxiliary K
    ((1,), 3584, 32, 8, "uint8", 8, True, (), AUX_K, None),
    ((2, 3), 4096, 16, 2, "uint8", 4, True, ("mac",), AUX_K, None),  # leading axes, 2-bit
    ((1,), 5120, 32, 4, "uint32", 4, False, ("vision",), AUX_K, None),
    ((1,), 11008, 16, 4, "uint8", 4, True, ("cws",), AUX_K, None),
    ((1,), 18944, 16, 4, "uint32", 4, True, (), AUX_K, None),
    ((3,), 128, 3584, 4, "uint8", 4, True, ("text",), AUX_K, None),  # wide N: 56 programs
]


class SplitGemmTests:
    implementation: str

    def gemm(self, x, w, terms, mask, bias, blocks=None, **kw):
        bm, bn = blocks or (None, None)
        return split_gemm(
            x, w, **terms, text_mask=mask, bias=bias, implementation=self.implementation,
            block_m=bm, block_n=bn, **kw,
        )

    @pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-K{c[1]}-N{c[2]}-w{c[3]}")
    def test_matches_integer_truth_and_float_product(self, case):
        blocks = case[-1]
        # integer parts: unit scales, integer bias -> every float op exact, compare bit for bit
        x, w, terms, mask, bias = operands(case, seed=0, unit_scale=True)
        want = truth(x, w, terms, mask, bias, exact=True)
        assert np.max(np.abs(want)) < 2**24
        got = self.gemm(x, w, terms, mask, bias, blocks)
        assert got.shape == (*case[0], case[2]) and got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
        # float epilogue: random scales, against float64 and against the XLA reference
        x, w, terms, mask, bias = operands(case, seed=1, unit_scale=False)
        got = self.gemm(x, w, terms, mask, bias, blocks)
        assert rel_err(got, truth(x, w, terms, mask, bias, exact=False)) < 1e-5
        ref = split_gemm_xla(x, w, **terms, text_mask=mask, bias=bias)
        assert rel_err(got, ref) < 1e-5

    def test_mac_only_on_text_tokens_and_bf16_output(self):
        case = ((130,), 256, 48, 4, "uint8", 4, False, TERMS, dict(cws=7, mac=11, text=40,
                vision=3), (32, 16))
        x, w, terms, mask, bias = operands(case, seed=2, unit_scale=False)
        with_mac = np.asarray(self.gemm(x, w, terms, mask, bias, case[-1]))
        rest = {k: v for k, v in terms.items() if k != "mac"}
        without = np.asarray(self.gemm(x, w, rest, mask, bias, case[-1]))
        m = np.asarray(mask)
        assert rel_err(with_mac[~m], without[~m]) < 1e-6
        assert np.max(np.abs(with_mac[m] - without[m])) > 1e-3
        y16 = self.gemm(x, w, terms, mask, bias, case[-1], out_dtype=jnp.bfloat16)
        assert y16.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y16, np.float32), with_mac, rtol=1e-2, atol=1e-2)

    def test_three_bit_weights_run_the_reference(self):
        rng = np.random.default_rng(3)
        x = rand_acts(rng, (4,), 40, 4, True, False)
        q = rng.integers(-4, 4, (24, 40))
        t = packing.PackedTensor(
            packing.pack(jnp.asarray(q, jnp.int32), 3, jnp.uint32, signed=True),
            jnp.asarray(rng.uniform(0.01, 0.1, 24), jnp.float32), None, 3, (24, 40), True, None,
            "uint32",
        )
        w = gemm_weight(t)
        got = self.gemm(x, w, {}, None, None)
        assert rel_err(got, truth(x, w, {}, None, np.zeros(24), exact=False)) < 1e-5

    @pytest.mark.parametrize(
        "bits,a_symmetric,main_path",
        [("w4a4", True, "masked"), ("w4a8", False, "gathered")],
    )
    def test_folded_group_matches_fake_quant_forward(self, bits, a_symmetric, main_path):
        """End to end: fold a group, quantize its activations, run every linear through the GEMM
        and compare with ``fold.folded_group_forward`` (fake quant from the stored weights)."""
        d, n_tok = 48, 12
        text_idx, vision_idx = np.array([3, 17]), np.array([8, 40])
        k = jax.random.split(jax.random.PRNGKey(0), 4)
        weights = {
            "q": {"w": jax.random.normal(k[0], (32, d)), "b": jax.random.normal(k[1], (32,))},
            "k": {"w": jax.random.normal(k[2], (16, d))},
        }
        outl = jnp.isin(jnp.arange(d), np.r_[text_idx, vision_idx])
        x = jax.random.normal(k[3], (n_tok, d)) * jnp.where(outl, 20.0, 1.0)
        text_mask = jnp.arange(n_tok) >= 4  # the first 4 tokens are vision
        cfg = method_config(
            "splitq", bits, a_symmetric=a_symmetric, main_path=main_path, mac_gate_init=0.5
        )
        p, c = sl.init_group(jax.random.PRNGKey(1), weights, cfg, text_idx=text_idx,
                             vision_idx=vision_idx, act_absmax=jnp.max(jnp.abs(x), axis=0))
        folded = transform.fold_group(p, c, cfg)
        want = fold.folded_group_forward(folded, x, text_mask, cfg)

        # The activation side, op by op as apply_group runs it (eagerly, like `want`).
        bits_ = sl.Bits.of(cfg)
        acts, split = folded["acts"], folded["split"]
        if main_path == "gathered":
            xm = jnp.take(x, split["main_idx"], axis=-1)
        else:
            xm = x * split["main_mask"].astype(x.dtype)
        xt = tf.apply_act(acts["transform"], xm)
        p_main = quant.quantize(xt, bits_.a, symmetric=a_symmetric, clip=acts["act_clip"])
        x_main = quantized_acts(p_main, bits_.a, a_symmetric)
        x_hat = quant.dequantize(p_main)  # what fake_quant hands to the branches
        outliers = {}
        for g in ("text", "vision"):
            xg = tf.apply_act(acts[g]["transform"], jnp.take(x, split[f"{g}_idx"], axis=-1))
            outliers[g] = quantize_acts(xg, bits_.aux_a, symmetric=a_symmetric,
                                        clip=acts[g]["act_clip"])
        dense = fold.materialize(folded["weights"])
        for name, stored in folded["weights"].items():
            gw = folded_weights(stored)
            terms = {g: (outliers[g], gw[g]) for g in ("text", "vision")}
            for branch in ("cws", "mac"):
                h = x_hat @ dense[name][branch]["l_in"].T.astype(x.dtype)
                terms[branch] = (quantize_acts(h, bits_.aux_a, symmetric=a_symmetric), gw[branch])
            got = self.gemm(x_main, gw["main"], terms, text_mask, folded["biases"][name])
            assert rel_err(got, want[name]) < 1e-5, name

    def test_input_checks(self):
        case = CASES[0]
        x, w, terms, mask, bias = operands(case, seed=4, unit_scale=False)
        with pytest.raises(ValueError, match="text_mask"):
            self.gemm(x, w, terms, None, bias)
        with pytest.raises(ValueError, match="K="):
            self.gemm(x, terms["cws"][1], {}, None, None)
        with pytest.raises(ValueError, match="int8"):
            self.gemm(dataclasses.replace(x, qvalue=x.qvalue.astype(jnp.int32)), w, {}, None, None)


class TestSplitGemmXla(SplitGemmTests):
    implementation = "xla"


class TestSplitGemmPallas(SplitGemmTests):
    implementation = "pallas"


# ----------------------------------------------------------------------------- shared pieces


def test_operand_conversions():
    rng = np.random.default_rng(5)
    xf = jnp.asarray(rng.normal(size=(6, 33)) + 0.5, jnp.float32)
    for bits in (4, 8):
        for sym in (True, False):
            p = quant.quantize(xf, bits, symmetric=sym)
            a = quantize_acts(xf, bits, symmetric=sym)
            assert a.qvalue.dtype == jnp.int8
            # the shifted int8 values dequantize exactly as quant.dequantize does
            np.testing.assert_array_equal(
                dequant_acts(a).astype(np.float32) * np.asarray(a.scale)[:, None],
                np.asarray(quant.dequantize(p)),
            )
    t = fold.pack_weight(sl.WeightSpec(jnp.asarray(rng.normal(size=(8, 20)), jnp.float32), 4,
                                       None), symmetric=True)
    g = gemm_weight(t)
    np.testing.assert_array_equal(np.asarray(g.row_sum), weight_ints(g).sum(-1))
    with pytest.raises(ValueError, match="symmetric"):
        gemm_weight(fold.pack_weight(sl.WeightSpec(jnp.ones((4, 8)), 4, None),
                                     symmetric=False))
    with pytest.raises(ValueError, match="groups"):
        gemm_weight(fold.pack_weight(sl.WeightSpec(jnp.ones((4, 8)), 4, None, 4), symmetric=True))


# ----------------------------------------------------------------------------- CUDA lowering


def _avals(rows, k, n, w_bits, word_dtype, a_sym, aux):
    def acts(kk, sym):
        z = None if sym else jax.ShapeDtypeStruct(rows, jnp.int32)
        return QuantizedActs(jax.ShapeDtypeStruct((*rows, kk), jnp.int8),
                             jax.ShapeDtypeStruct(rows, jnp.float32), z)

    def weight(kk, bits, wdt):
        cc = jnp.dtype(wdt).itemsize * 8 // bits
        return GemmWeight(jax.ShapeDtypeStruct((n, -(-kk // cc)), jnp.dtype(wdt)),
                          jax.ShapeDtypeStruct((n,), jnp.float32),
                          jax.ShapeDtypeStruct((n,), jnp.int32), bits, kk, jnp.dtype(wdt).name)

    terms = {name: (acts(kk, a_sym), weight(kk, 4, "uint8")) for name, kk in aux.items()}
    return acts(k, a_sym), weight(k, w_bits, word_dtype), terms


@pytest.mark.parametrize(
    "rows,k,n,w_bits,word_dtype,a_sym,aux,bias,out_dtype",
    [
        # Qwen2.5-VL-7B shapes: gate/up (3584 -> 18944) at decode, every term, asymmetric acts
        ((1,), 3584, 18944, 4, "uint8", False, AUX_K, True, jnp.bfloat16),
        # down_proj (18944 -> 3584) prefill, symmetric, CWS only, uint32 words
        ((2048,), 18944, 3584, 4, "uint32", True, dict(cws=72), False, jnp.float32),
        # o_proj-like (3584 -> 3584), 8-bit weights, outliers + MAC
        ((16,), 3584, 3584, 8, "uint8", True, dict(mac=108, text=72, vision=72), True,
         jnp.float32),
        ((4, 7), 896, 896, 2, "uint8", False, {}, False, jnp.float32),  # 2-bit, leading axes
    ],
)
def test_cuda_lowering(rows, k, n, w_bits, word_dtype, a_sym, aux, bias, out_dtype):
    x, w, terms = _avals(rows, k, n, w_bits, word_dtype, a_sym, aux)
    mask = jax.ShapeDtypeStruct(rows, jnp.bool_) if "mac" in terms else None
    b = jax.ShapeDtypeStruct((n,), jnp.float32) if bias else None

    def f(x_, w_, terms_, mask_, b_):
        return split_gemm(x_, w_, **terms_, text_mask=mask_, bias=b_, out_dtype=out_dtype,
                          implementation="pallas", interpret=False)

    exp = export_cuda(f, x, w, terms, mask, b)
    text = exp.mlir_module()
    assert text.count(TRITON_CALL) == 1  # every term, the epilogue and the bias: one kernel
    (out,) = exp.out_avals
    assert out.shape == (*rows, n) and out.dtype == jnp.dtype(out_dtype)


def test_triton_compiles_to_cubin(tmp_path):
    """The kernel through Triton's own compiler to PTX and cubin for sm_90 (no GPU needed): the
    dots become int8 tensor-core instructions. Runs where ``triton`` is installed (it is not a CPU
    dependency of the project)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from splitq_jax.pallas.testing import triton_ir

    for rows, k, n, aux in (((1,), 3584, 18944, AUX_K), ((2048,), 3584, 18944, dict(cws=72))):
        x, w, terms = _avals(rows, k, n, 4, "uint8", False, aux)
        mask = jax.ShapeDtypeStruct(rows, jnp.bool_) if "mac" in terms else None
        (text,) = triton_ir(
            lambda x_, w_, t_, m_: split_gemm(x_, w_, **t_, text_mask=m_,
                                              implementation="pallas", interpret=False),
            x, w, terms, mask,
        )
        path = tmp_path / "split_gemm.ttir"
        path.write_text(text)
        compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32))
        ptx = compiled.asm["ptx"]
        assert "s32.s8.s8" in ptx  # int8 x int8 -> int32 MMA (mma.sync or wgmma)
        assert len(compiled.asm["cubin"]) > 0
