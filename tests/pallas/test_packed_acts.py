"""Packed activation operands (``QuantizedActs`` with ``lane_bits=4``: two signed 4-bit lanes per
uint8 for 2..4-bit activations; int8 at 5..8 bits) between ``act_pack`` and ``split_gemm``.

The packed path must carry exactly the integers of the int8 path: the format round-trips, the
activation kernel's packed outputs equal its reference's and the packed int8 outputs, and the
split GEMM gives bit-identical results from either format (interpret mode on CPU, both
implementations). Plus the CUDA lowering of the changed kernels and the bytes that cross HBM.
Shapes: the hidden (2048, 3584, 4096, 5120) and intermediate (11008, 13824, 18944) widths, ragged
and odd token counts, odd K (a zero pad lane), odd branch ranks (aligned segments), gathered
widths with an odd Kronecker column count (packed outside the kernel); bits 2, 3, 4, 8, sym/asym.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_act_pack import Case, make, run
from test_split_gemm import AUX_K, rand_acts, rand_weight

from splitq_jax import packing, quant
from splitq_jax.pallas.act_pack import ActPacked, act_pack_pallas
from splitq_jax.pallas.act_pack import api as act_api
from splitq_jax.pallas.split_gemm import (
    GemmWeight,
    QuantizedActs,
    act_lane_bits,
    pack_acts,
    quantize_acts,
    split_gemm,
)
from splitq_jax.pallas.testing import TRITON_CALL, export_cuda


def packed_like(p: ActPacked, main_bits: int, aux_bits: int) -> ActPacked:
    """The int8 outputs ``p`` packed as ``act_pack(..., packed=True)`` must store them."""
    main = pack_acts(p.main, act_lane_bits(main_bits))
    la = act_lane_bits(aux_bits)
    return ActPacked(main, {k: pack_acts(v, la) for k, v in p.outliers.items()},
                     {k: pack_acts(v, la) for k, v in p.branches.items()})


def assert_acts_equal(got: QuantizedActs, want: QuantizedActs, what=""):
    assert (got.lane_bits, got.width) == (want.lane_bits, want.width), what
    assert got.qvalue.dtype == want.qvalue.dtype and got.qvalue.shape == want.qvalue.shape, what
    np.testing.assert_array_equal(np.asarray(got.qvalue), np.asarray(want.qvalue), err_msg=what)
    np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale), err_msg=what)
    assert (got.zero_point is None) == (want.zero_point is None), what
    if want.zero_point is not None:
        np.testing.assert_array_equal(np.asarray(got.zero_point), np.asarray(want.zero_point))


def assert_all_equal(got: ActPacked, want: ActPacked):
    assert_acts_equal(got.main, want.main, "main")
    for part in ("outliers", "branches"):
        g, w = getattr(got, part), getattr(want, part)
        assert g.keys() == w.keys()
        for k in w:
            assert_acts_equal(g[k], w[k], f"{part}/{k}")


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_format_round_trip_and_bytes(bits, symmetric):
    rng = np.random.default_rng(bits)
    k = 37  # odd: one zero pad lane
    x = jnp.asarray(rng.uniform(-3.0, 4.0, (2, 5, k)), jnp.float32)
    a8 = quantize_acts(x, bits, symmetric=symmetric)
    ap = quantize_acts(x, bits, symmetric=symmetric, packed=True)
    q = np.asarray(a8.qvalue)
    if bits <= 4:
        assert ap.lane_bits == 4 and ap.width == k and ap.qvalue.dtype == jnp.uint8
        assert ap.qvalue.shape == (2, 5, (k + 1) // 2)
        # the layout of packing.pack(q, 4, uint8, signed=True): low nibble first, zero pad lane
        w = np.asarray(ap.qvalue).astype(np.int64)
        np.testing.assert_array_equal(w[..., :-1] & 15, q[..., 0:-1:2] & 15)
        np.testing.assert_array_equal(w[..., :-1] >> 4, q[..., 1::2] & 15)
        np.testing.assert_array_equal(w[..., -1], q[..., -1] & 15)
        # negative values and (nearly) every level: the sign extension is exercised
        assert q.min() < 0 < q.max() and len(np.unique(q)) >= (1 << bits) - 2
    else:
        assert ap.lane_bits == 8 and ap.qvalue.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(ap.values()), q)
    np.testing.assert_array_equal(np.asarray(ap.scale), np.asarray(a8.scale))
    assert (ap.zero_point is None) == symmetric
    back = pack_acts(ap, 8)
    assert back.lane_bits == 8 and back.k is None
    np.testing.assert_array_equal(np.asarray(back.qvalue), q)
    # dequantization from the packed integers equals quant.dequantize
    deq = np.asarray(ap.values(), np.int64)
    if not symmetric:
        deq = deq - np.asarray(ap.zero_point)[..., None]
    np.testing.assert_array_equal(
        (deq.astype(np.float32) * np.asarray(ap.scale)[..., None]),
        np.asarray(quant.dequantize(quant.quantize(x, bits, symmetric=symmetric))),
    )


def test_bytes_per_token():
    """Activation operand bytes per token: A4 ``K / 2`` + 4 (scale) [+ 4 (zero point)], A8 ``K``
    + 4 [+ 4]: what crosses HBM between act_pack and split_gemm (outputs of the kernel path)."""
    for bits, sym, per_token, impl in ((4, False, 3584 // 2 + 8, "pallas"),
                                       (4, True, 3584 // 2 + 4, "xla"),
                                       (3, True, 3584 // 2 + 4, "xla"),
                                       (8, True, 3584 + 4, "xla")):
        x, kw = make(Case(3584, 3, bits, sym, outliers=False, branches=()))
        p = run(x, kw, impl, packed=True)
        nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(p.main))
        assert nbytes == 3 * per_token, (bits, sym)
        i8 = run(x, kw, "xla")
        assert sum(a.nbytes for a in jax.tree_util.tree_leaves(i8.main)) == 3 * (
            3584 + (4 if sym else 8))


def test_checks():
    rng = np.random.default_rng(0)
    a = pack_acts(rand_acts(rng, (3,), 33, 4, True, False))
    w = rand_weight(rng, 16, 33, 4, "uint8", False)
    with pytest.raises(ValueError, match="do not hold K"):
        split_gemm(dataclasses.replace(a, k=35), w, implementation="xla")
    with pytest.raises(ValueError, match="uint8"):
        split_gemm(dataclasses.replace(a, qvalue=a.qvalue.astype(jnp.int8)), w,
                   implementation="pallas")
    with pytest.raises(ValueError, match="weight K"):
        split_gemm(a, rand_weight(rng, 16, 34, 4, "uint8", False), implementation="pallas")
    with pytest.raises(ValueError, match="lane_bits"):
        split_gemm(dataclasses.replace(a, lane_bits=2), w, implementation="xla")
    with pytest.raises(ValueError, match="out of range"):  # 8-bit values do not fit 4-bit lanes
        pack_acts(rand_acts(rng, (3,), 33, 8, True, False))


# ----------------------------------------------------------------------------- split GEMM


def gemm_case(rows, k, n, w_bits, a_bits, a_sym, term_ks, seed=0):
    rng = np.random.default_rng(seed)
    x = rand_acts(rng, rows, k, a_bits, a_sym, False)
    w = rand_weight(rng, n, k, w_bits, "uint8", False)
    terms, term_bits = {}, {}
    for i, (name, kk) in enumerate(term_ks.items()):
        term_bits[name] = max(a_bits, 4) if i % 2 else min(a_bits, 4)
        terms[name] = (rand_acts(rng, rows, kk, term_bits[name], a_sym != bool(i % 2), False),
                       rand_weight(rng, n, kk, 4, ("uint8", "uint32")[i % 2], False))
    mask = jnp.asarray(rng.random(rows) < 0.5)
    bias = jnp.asarray(rng.normal(0, 1, n), jnp.float32)
    return x, w, terms, term_bits, mask, bias


def check_gemm_packed_equals_int8(rows, k, n, w_bits, a_bits, a_sym, term_ks, blocks=None):
    x, w, terms, term_bits, mask, bias = gemm_case(rows, k, n, w_bits, a_bits, a_sym, term_ks)
    xp = pack_acts(x, act_lane_bits(a_bits))
    tp = {name: (pack_acts(a, act_lane_bits(term_bits[name])), b)
          for name, (a, b) in terms.items()}
    if a_bits <= 4:
        assert xp.qvalue.nbytes == x.qvalue.nbytes // k * ((k + 1) // 2)
    bm, bn = blocks or (None, None)
    kw = dict(text_mask=mask if "mac" in terms else None, bias=bias)
    want = split_gemm(x, w, **terms, **kw, implementation="xla")
    for impl in ("xla", "pallas"):
        extra = dict(block_m=bm, block_n=bn) if impl == "pallas" else {}
        got = split_gemm(xp, w, **tp, **kw, implementation=impl, **extra)
        same = split_gemm(x, w, **terms, **kw, implementation=impl, **extra)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(same), err_msg=impl)
        if impl == "xla":
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        else:
            assert float(np.max(np.abs(np.asarray(got) - np.asarray(want)))) <= 1e-5 * float(
                np.max(np.abs(np.asarray(want))))


# (rows, K, N, w bits, a bits, a symmetric, aux terms, blocks)
GEMM_FAST = [
    ((130,), 255, 48, 4, 4, False, dict(cws=7, mac=11, text=40, vision=3), (32, 16)),  # ragged
    ((3,), 37, 16, 2, 3, True, dict(cws=5), None),  # odd K, 3-bit acts on 2-bit weights
    ((1,), 3584, 16, 4, 2, False, dict(text=72), None),
    ((2, 3), 2048, 16, 8, 8, True, dict(mac=9), None),  # A8: int8 main, packed 4-bit aux
]
GEMM_SLOW = [
    ((1,), 4096, 16, 4, 4, True, AUX_K, None),
    ((7,), 5120, 32, 4, 3, False, dict(cws=103), None),
    ((1,), 11008, 16, 4, 4, False, dict(vision=221), None),
    ((5,), 13824, 16, 2, 2, True, dict(cws=277, text=277), None),
    ((1,), 18944, 16, 4, 4, True, dict(mac=569), None),
    ((33,), 3584, 64, 4, 4, False, AUX_K, (16, 32)),
]


@pytest.mark.parametrize("case", GEMM_FAST, ids=lambda c: f"M{c[0]}-K{c[1]}-w{c[3]}a{c[4]}")
def test_split_gemm_packed_equals_int8(case):
    check_gemm_packed_equals_int8(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", GEMM_SLOW, ids=lambda c: f"M{c[0]}-K{c[1]}-w{c[3]}a{c[4]}")
def test_split_gemm_packed_equals_int8_sweep(case):
    check_gemm_packed_equals_int8(*case)


# ----------------------------------------------------------------------------- act_pack


def check_act_pack_packed(case: Case, end_to_end: bool = False):
    x, kw = make(case)
    aux = kw["aux_bits"]
    want = packed_like(run(x, kw, "xla"), case.bits, aux)
    ref = run(x, kw, "xla", packed=True)
    assert_all_equal(ref, want)
    got = run(x, kw, "pallas", packed=True, block_rows=case.block_rows)
    assert_all_equal(got, want)
    if case.bits <= 4:
        assert got.main.lane_bits == 4 and got.main.qvalue.dtype == jnp.uint8
    if end_to_end:  # act_pack + split_gemm: packed and int8 operands give identical outputs
        rng = np.random.default_rng(1)
        i8 = run(x, kw, "pallas", block_rows=case.block_rows)
        n = 16
        w = rand_weight(rng, n, got.main.width, 4, "uint8", False)
        bw = {k: rand_weight(rng, n, h.width, 4, "uint8", False) for k, h in got.branches.items()}
        gw = {k: rand_weight(rng, n, h.width, 4, "uint32", False) for k, h in got.outliers.items()}

        def gemm(p):
            terms = {"cws": (p.branches[next(iter(bw))], bw[next(iter(bw))])}
            terms.update({g: (p.outliers[g], gw[g]) for g in p.outliers})
            return split_gemm(p.main, w, **terms, implementation="pallas")

        np.testing.assert_array_equal(np.asarray(gemm(got)), np.asarray(gemm(i8)))


ACT_FAST = [
    # 96 = 8 x 12; gathered 92 = 4 x 23 (odd n2: packed outside the kernel); odd branch ranks
    Case(96, 7, 4, False, branches=(7, 12, 5)),
    Case(96, 33, 3, True, "gathered", branches=(9,), block_rows=16),  # ragged rows
    Case(96, 5, 2, False, transform=False, branches=(3, 8)),  # no transform: n1 == 1, any K
]
ACT_SLOW = [
    Case(96, 3, 8, True, branches=(5,)),  # A8 main stays int8, aux at 8 bits too
    Case(3584, 1, 4, True, branches=(71,)),  # 56 x 64
    Case(2048, 7, 4, False, branches=(41, 61)),
    Case(3584, 64, 4, False, "gathered", branches=(71,)),  # 43 x 80
    Case(4096, 3, 2, True, branches=(9,)),
    Case(5120, 1, 3, False, "gathered", branches=(103,)),  # 63 x 78
    Case(11008, 1, 4, True, branches=(221,)),
    Case(13824, 1, 4, False, branches=(277,)),
    Case(18944, 1, 4, True, "gathered", branches=(379,)),  # 42 x 433: odd n2
    Case(96, 1000, 4, True, branches=(7, 5), block_rows=64),
]


@pytest.mark.parametrize("case", ACT_FAST, ids=str)
def test_act_pack_packed(case):
    check_act_pack_packed(case, end_to_end=case.d == 96 and case.m == 7)


@pytest.mark.slow
@pytest.mark.parametrize("case", ACT_SLOW, ids=str)
def test_act_pack_packed_sweep(case):
    check_act_pack_packed(case, end_to_end=True)


# ----------------------------------------------------------------------------- CUDA lowering


@pytest.mark.parametrize(
    "m,d,bits,symmetric,main_path,dtype,pack_main",
    [
        (16, 3584, 4, False, "masked", jnp.float32, True),  # 56 x 64, 3 odd-rank branches
        pytest.param(130, 2048, 2, True, "masked", jnp.bfloat16, True, marks=pytest.mark.slow),
        (1, 18944, 3, True, "gathered", jnp.float32, False),  # 42 x 433: int8 main
    ],
)
def test_act_pack_cuda_lowering_packed(m, d, bits, symmetric, main_path, dtype, pack_main):
    x, kw = make(Case(d, 1, bits, symmetric, main_path,
                      branches=tuple(math.ceil(0.02 * d) + 7 * i for i in range(3))))
    plan, ops = act_api._prepare(jnp.zeros((m, d), dtype), main_path, kw["main_mask"],
                                 kw["main_idx"], kw["transform"], kw["act_clip"], kw["outliers"],
                                 kw["branches"], 4, 4)
    assert plan.pack_main == pack_main
    ops = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), ops)

    def f(xx, *o):
        return act_pack_pallas(xx, *o, plan=plan, main_bits=bits, aux_bits=4,
                               symmetric=symmetric, block_rows=1 if d > 8192 else 2,
                               interpret=False)

    exp = export_cuda(f, jax.ShapeDtypeStruct((m, d), dtype), *ops)
    assert exp.mlir_module().count(TRITON_CALL) == 1
    main_q = exp.out_avals[0]
    if pack_main:
        assert main_q.shape == (m, plan.n1, plan.n2 // 2) and main_q.dtype == jnp.uint8
    else:
        assert main_q.shape == (m, plan.n1, plan.n2) and main_q.dtype == jnp.int8
    end = plan.branch_offsets[-1] + plan.branch_sizes[-1]
    assert all(o % 2 == 0 for o in plan.branch_offsets)
    hq = exp.out_avals[-3]
    assert hq.shape == (m, -(-end // 2)) and hq.dtype == jnp.uint8
    for g in range(len(plan.groups)):
        gq = exp.out_avals[3 + 3 * g]
        assert gq.shape == (m, -(-plan.groups[g][1].k // 2)) and gq.dtype == jnp.uint8


@pytest.mark.parametrize("rows,k,n,a_sym,aux", [
    ((1,), 3584, 18944, False, dict(AUX_K, cws=71)),  # decode, every term packed, odd rank
    ((2048,), 18944, 3584, True, dict(cws=72)),  # prefill down_proj
])
def test_split_gemm_cuda_lowering_packed(rows, k, n, a_sym, aux):
    def acts(kk, sym):
        z = None if sym else jax.ShapeDtypeStruct(rows, jnp.int32)
        return QuantizedActs(jax.ShapeDtypeStruct((*rows, -(-kk // 2)), jnp.uint8),
                             jax.ShapeDtypeStruct(rows, jnp.float32), z, 4, kk)

    def weight(kk):
        return GemmWeight(jax.ShapeDtypeStruct((n, packing.packed_length(kk, 4)), jnp.uint8),
                          jax.ShapeDtypeStruct((n,), jnp.float32),
                          jax.ShapeDtypeStruct((n,), jnp.int32), 4, kk, "uint8")

    terms = {name: (acts(kk, a_sym), weight(kk)) for name, kk in aux.items()}
    mask = jax.ShapeDtypeStruct(rows, jnp.bool_) if "mac" in terms else None

    def f(x_, w_, t_, m_):
        return split_gemm(x_, w_, **t_, text_mask=m_, implementation="pallas", interpret=False)

    exp = export_cuda(f, acts(k, a_sym), weight(k), terms, mask)
    assert exp.mlir_module().count(TRITON_CALL) == 1
    (out,) = exp.out_avals
    assert out.shape == (*rows, n)
