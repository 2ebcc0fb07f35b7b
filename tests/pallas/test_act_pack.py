"""splitq_jax.pallas.act_pack: the one-pass activation stage against its XLA reference, and the
reference against the runtime's former pre-GEMM computation.

Exactness. Every integer output (int8 values, zero points) and every scale of the interpreted
kernel must equal the reference bit for bit. Both quantize float transforms of the activations, so
"bit for bit" needs the float transforms to agree exactly; XLA:CPU's float dots round differently
with their context (a dot fused with the preceding gather of the reference rounds differently from
the same dot alone, measured), so the exact tests use *exactly representable* data: activations on
a dyadic grid, sparse signed-permutation transform factors (two entries per column, 1 and 1/2) and
power-of-two ``c``, where every dot is exact in float32 whatever its summation order. That checks
everything the kernel does (gathers, masks, padding of non-power-of-two factors, the order and
transposition of the factors, clipping, quantization, the int8 branch dots, the epilogue, the
per-branch re-quantization) for equality. With dense random factors (``test_dense_factors``) the
floats agree to 1e-5 and integers may differ by one level where a value lies within round-off of a
rounding boundary.

Shapes: the hidden (2048, 3584, 4096, 5120) and intermediate (11008, 13824, 18944) widths of the
target models with their ``kron_factors`` (most are not powers of two: padded inside the kernel),
few rows there; token counts 1, 7, 64 and a ragged 1000 on small synthetic widths.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax.methods import transform
from splitq_jax import packing
from splitq_jax.quantized import fold
from splitq_jax.methods.splitq import split_linear as sl
from splitq_jax import transforms as tf
from splitq_jax.config import method_config
from splitq_jax.pallas.act_pack import (
    ActPacked,
    OutlierGroup,
    act_pack,
    act_pack_pallas,
    act_pack_xla,
    kernel_path,
)
from splitq_jax.pallas.act_pack import api as act_api
from splitq_jax.pallas.split_gemm import gemm_weight, quantize_acts, split_gemm
from splitq_jax.pallas.testing import TRITON_CALL, export_cuda

# ----------------------------------------------------------------------------- test data


def sparse_factor(rng, n):
    """``S1 + S2 / 2`` for random signed permutations: invertible-ish, exact in any sum order."""
    def perm():
        m = np.zeros((n, n))
        m[np.arange(n), rng.permutation(n)] = rng.choice([-1.0, 1.0], n)
        return m
    return perm() + 0.5 * perm()


def packed_weight(rng, n, k, bits=4):
    q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (n, k))
    t = packing.PackedTensor(
        packing.pack(jnp.asarray(q, jnp.int32), bits, jnp.uint8, signed=True),
        jnp.asarray(rng.uniform(0.002, 0.05, n), jnp.float32), None, bits, (n, k), True, None,
        "uint8",
    )
    return gemm_weight(t)


@dataclasses.dataclass
class Case:
    d: int
    m: int
    bits: int
    symmetric: bool
    main_path: str = "masked"
    outliers: bool = True
    branches: tuple[int, ...] = (8, 12)
    clip: bool = True
    c: bool = True
    transform: bool = True
    dtype: str = "float32"
    block_rows: int | None = None

    def __str__(self):
        return (f"d{self.d}-m{self.m}-a{self.bits}-{'sym' if self.symmetric else 'asym'}-"
                f"{self.main_path}{'-outl' if self.outliers else ''}"
                f"{'-br' if self.branches else ''}{'' if self.transform else '-noT'}"
                f"{'' if self.clip else '-noclip'}{'-' + self.dtype if self.dtype != 'float32' else ''}")


def make(case: Case, seed=0, exact=True):
    """``(x, kwargs)`` of one case; exact data (see the module docstring) unless ``exact=False``."""
    rng = np.random.default_rng(seed)
    d = case.d
    k_o = max(2, math.ceil(0.02 * d)) if case.outliers else 0
    perm = rng.permutation(d)
    t_idx, v_idx = np.sort(perm[:k_o]), np.sort(perm[k_o:2 * k_o])
    mask = np.ones(d, np.float32)
    mask[np.r_[t_idx, v_idx]] = 0
    main_idx = np.nonzero(mask)[0].astype(np.int32)
    km = main_idx.size if case.main_path == "gathered" else d
    if exact:
        x = rng.integers(-200, 200, (case.m, d)) / 2.0  # 8 significant bits: bf16-exact too
        x[:, t_idx] *= 4.0
        x[:, v_idx] *= -2.0
    else:
        x = rng.standard_t(3.0, (case.m, d)) * 2.0 + 0.3
    x = jnp.asarray(x, jnp.float32).astype(case.dtype)

    def factor(n):
        f = sparse_factor(rng, n) if exact else tf.random_orthogonal(
            jax.random.PRNGKey(int(rng.integers(1 << 30))), n)
        return jnp.asarray(f, jnp.float32)

    transform = None
    if case.transform:
        n1, n2 = tf.kron_factors(km)
        transform = {"p1": factor(n1), "p2": factor(n2)}
        if case.c:
            c = 2.0 ** rng.integers(-2, 3, km) if exact else rng.uniform(0.5, 2.0, km)
            transform["c"] = jnp.asarray(c, jnp.float32)

    def clip():
        if not case.clip:
            return None
        return {k: jnp.asarray(rng.uniform(-1.0, 5.0), jnp.float32) for k in ("max", "min")}

    outliers = {}
    if case.outliers:
        outliers = {
            "text": OutlierGroup(jnp.asarray(t_idx), {"p": factor(k_o)}, clip()),
            "vision": OutlierGroup(jnp.asarray(v_idx), None if k_o > 40 else {"p": factor(k_o)},
                                   None),
        }
    branches = {f"lin{i}/{'cws' if i % 2 == 0 else 'mac'}": packed_weight(rng, r, km, (4, 8)[i % 2])
                for i, r in enumerate(case.branches)}
    kw = dict(main_bits=case.bits, aux_bits=max(case.bits, 4), symmetric=case.symmetric,
              main_path=case.main_path, main_mask=jnp.asarray(mask), main_idx=jnp.asarray(main_idx),
              transform=transform, act_clip=clip(), outliers=outliers, branches=branches)
    return x, kw


def leaves(p: ActPacked):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(p)}


def assert_packed_equal(got: ActPacked, want: ActPacked):
    g, w = leaves(got), leaves(want)
    assert g.keys() == w.keys()
    for key in w:
        assert g[key].shape == w[key].shape and g[key].dtype == w[key].dtype, key
        np.testing.assert_array_equal(np.asarray(g[key]), np.asarray(w[key]), err_msg=key)


def run(x, kw, impl, **extra):
    return act_pack(x, implementation=impl, **kw, **extra)


# ----------------------------------------------------------------------------- kernel == reference

FAST = [
    # token counts on a small synthetic width (96 = 8 x 12: both factors padded to 16)
    Case(96, 1, 4, True),
    Case(96, 7, 4, False),
    Case(96, 64, 3, True, block_rows=16),
    Case(96, 1000, 4, False, "gathered", block_rows=64),  # ragged last program
    Case(96, 7, 2, False, clip=False, c=False),
    Case(96, 7, 8, True, "gathered"),
    Case(96, 7, 4, True, outliers=False, branches=()),
    Case(96, 7, 4, False, transform=False),  # identity main transform (rtn)
    Case(96, 7, 4, True, "gathered", dtype="bfloat16"),
    # a target width and an intermediate one (factors 64x80 and 128x148); the
    # other classes of kron_factors are in SLOW
    Case(5120, 1, 3, False),
    Case(18944, 1, 2, False, clip=False, branches=(8,)),
]
SLOW = [
    # the target widths (classes of kron_factors): 32x64, 56x64, 64x64
    Case(2048, 1, 4, True),
    Case(3584, 7, 4, False, "gathered"),
    Case(4096, 1, 8, True, outliers=False),
    # intermediate widths: 86x128, 108x128 (and, gathered, those of d - 2k)
    Case(11008, 1, 4, True, branches=(8,)),
    Case(13824, 1, 4, True, "gathered", branches=(8,)),
    Case(3584, 64, 4, False),
    Case(4096, 130, 4, True, "gathered"),
    Case(5120, 16, 8, False, "gathered"),
    Case(11008, 7, 4, False, "gathered"),
    Case(18944, 7, 4, True),
    Case(13824, 3, 3, False),
    Case(2048, 1000, 4, True, block_rows=4),
]


@pytest.mark.parametrize("case", FAST, ids=str)
def test_kernel_matches_reference(case):
    x, kw = make(case)
    assert kernel_path(x.shape, x.dtype, case.main_path, kw["main_idx"], kw["transform"]) is None
    want = run(x, kw, "xla")
    got = run(x, kw, "pallas", block_rows=case.block_rows)
    assert_packed_equal(got, want)
    assert got.main.qvalue.dtype == jnp.int8
    assert (got.main.zero_point is None) == case.symmetric
    assert set(got.branches) == set(kw["branches"])


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=str)
def test_kernel_matches_reference_sweep(case):
    test_kernel_matches_reference(case)


def test_exact_data_is_not_trivial():
    """The exact-data cases exercise real quantization: values differ across many levels, every
    row has its own scale, and the branch intermediates are non-zero."""
    x, kw = make(Case(96, 7, 4, True))
    p = run(x, kw, "xla")
    q = np.asarray(p.main.qvalue)
    assert len(np.unique(q)) >= 12 and len(np.unique(np.asarray(p.main.scale))) == 7
    for h in p.branches.values():
        assert np.abs(np.asarray(h.qvalue)).max() > 0


def test_extreme_rows():
    """Tokens scaled by 2^-120 .. 2^100 and all-zero tokens: the kernel equals the reference, and
    a token scaled by a power of two keeps its main-path codes (exact data stays exact)."""
    for case in (Case(96, 7, 4, False), Case(96, 7, 3, True, "gathered")):
        x, kw = make(case)
        f = jnp.asarray([2.0**-100, 0.0, 2.0**100, 2.0**-120, 1.0, 1.0, 1.0], x.dtype)[:, None]
        xs = x * f
        want, got = run(xs, kw, "xla"), run(xs, kw, "pallas")
        assert_packed_equal(got, want)
        base = run(x, kw, "xla")
        for i in (0, 2, 3):
            np.testing.assert_array_equal(np.asarray(got.main.qvalue[i]), np.asarray(base.main.qvalue[i]))
        for qa in (got.main, *got.outliers.values(), *got.branches.values()):
            assert np.all(np.isfinite(np.asarray(qa.scale))) and np.all(np.asarray(qa.scale) > 0)


def test_dense_factors():
    """Random orthogonal factors (inexact float dots): scales within 1e-5, integers within one
    level, and almost all equal."""
    for case in (Case(3584, 7, 4, False, "gathered"), Case(96, 64, 8, True)):
        x, kw = make(case, exact=False)
        want, got = run(x, kw, "xla"), run(x, kw, "pallas")
        g, w = leaves(got), leaves(want)
        for key in w:
            a, b = np.asarray(g[key], np.float64), np.asarray(w[key], np.float64)
            if g[key].dtype == jnp.float32:
                np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=key)
            else:
                assert np.abs(a - b).max() <= 1, key
                assert np.mean(a != b) < 1e-3, key


def test_wrong_operands_raise():
    x, kw = make(Case(96, 3, 4, True))
    with pytest.raises(ValueError, match="main width"):
        run(x, {**kw, "transform": {"p1": jnp.eye(4), "p2": jnp.eye(4)}}, "pallas")
    with pytest.raises(ValueError, match="K="):
        run(x, {**kw, "branches": {"b": packed_weight(np.random.default_rng(0), 4, 50)}}, "pallas")
    with pytest.raises(ValueError, match="main_idx"):
        run(x, {**kw, "main_path": "gathered", "main_idx": None}, "pallas")
    with pytest.raises(ValueError, match="dtype"):
        run(x.astype(jnp.int32), kw, "pallas")
    with pytest.raises(TypeError, match="OutlierGroup"):
        run(x, {**kw, "outliers": {"text": (kw["outliers"]["text"].idx, None, None)}}, "pallas")
    with pytest.raises(ValueError, match="unknown implementation"):
        run(x, kw, "cuda")


def test_explicit_fallbacks():
    """A dense main transform runs the reference (documented in the api); it is still correct."""
    x, kw = make(Case(96, 3, 4, True))
    dense = {"p": jnp.asarray(sparse_factor(np.random.default_rng(1), 96), jnp.float32)}
    assert kernel_path(x.shape, x.dtype, "masked", None, dense) == "dense main transform"
    kw = {**kw, "transform": dense, "branches": {}}
    assert_packed_equal(run(x, kw, "pallas"), run(x, kw, "xla"))
    assert kernel_path((0, 96), x.dtype, "masked", None, None) == "no rows"


# ----------------------------------------------------------------------------- tie to the runtime


# slow: a regression check against the path the kernel replaced; the kernel is checked against
# the reference (test_kernel_matches_reference) and the runtime against fake quant in make test.
@pytest.mark.slow
@pytest.mark.parametrize("bits,a_symmetric,main_path", [("w4a4", True, "masked"),
                                                         ("w4a8", False, "gathered")])
def test_reference_equals_former_runtime_path(bits, a_symmetric, main_path):
    """On a folded tiny group, the reference equals, bit for bit, what ``qlinear`` computed before
    its GEMMs until act_pack replaced it (spelled out here op by op), and the interpreted kernel
    equals both; the whole linear (act_pack + split_gemm) matches the fake-quant forward."""
    d, n_tok = 48, 12
    text_idx, vision_idx = np.array([3, 17]), np.array([8, 40])
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    weights = {"q": {"w": jax.random.normal(k[0], (32, d)), "b": jax.random.normal(k[1], (32,))},
               "k": {"w": jax.random.normal(k[2], (16, d))}}
    outl = jnp.isin(jnp.arange(d), np.r_[text_idx, vision_idx])
    x = jax.random.normal(k[3], (2, n_tok // 2, d)) * jnp.where(outl, 20.0, 1.0)
    text_mask = (jnp.arange(n_tok) >= 4).reshape(2, -1)
    cfg = method_config("splitq", bits, a_symmetric=a_symmetric, main_path=main_path,
                        mac_gate_init=0.5)
    p, c = sl.init_group(jax.random.PRNGKey(1), weights, cfg, text_idx=text_idx,
                         vision_idx=vision_idx, act_absmax=jnp.max(jnp.abs(x), axis=(0, 1)))
    folded = transform.fold_group(p, c, cfg)
    b = sl.Bits.of(cfg)
    acts, split = folded["acts"], folded["split"]

    @jax.jit
    def former(x):  # qlinear.quantized_group_apply's activation side before act_pack
        if main_path == "gathered":
            xm = jnp.take(x, split["main_idx"], axis=-1)
        else:
            xm = x * split["main_mask"].astype(x.dtype)
        xq = quantize_acts(tf.apply_act(acts["transform"], xm), b.a, symmetric=a_symmetric,
                           clip=acts["act_clip"])
        groups = {g: quantize_acts(tf.apply_act(acts[g]["transform"],
                                                jnp.take(x, split[f"{g}_idx"], axis=-1)),
                                   b.aux_a, symmetric=a_symmetric, clip=acts[g]["act_clip"])
                  for g in ("text", "vision")}
        hs = {}
        for name, w in folded["weights"].items():
            for br in ("cws", "mac"):
                h = split_gemm(xq, gemm_weight(w[br]["l_in"]), implementation="xla").astype(x.dtype)
                hs[f"{name}/{br}"] = quantize_acts(h, b.aux_a, symmetric=a_symmetric)
        return ActPacked(xq, groups, hs)

    kw = dict(main_bits=b.a, aux_bits=b.aux_a, symmetric=a_symmetric, main_path=main_path,
              main_mask=split["main_mask"], main_idx=split["main_idx"],
              transform=acts["transform"], act_clip=acts["act_clip"],
              outliers={g: OutlierGroup(split[f"{g}_idx"], acts[g]["transform"],
                                        acts[g]["act_clip"]) for g in ("text", "vision")},
              branches={f"{n}/{br}": gemm_weight(w[br]["l_in"])
                        for n, w in folded["weights"].items() for br in ("cws", "mac")})
    want = former(x)
    ref = act_pack_xla(x, **kw)
    assert_packed_equal(ref, want)
    assert_packed_equal(act_pack(x, **kw, implementation="pallas"), want)

    # the whole quantized linear (one act_pack, one split_gemm per linear) == fake quant
    from splitq_jax.quantized import qlinear
    fake = fold.folded_group_forward(folded, x, text_mask, cfg)
    for impl in ("xla", "pallas"):
        got = qlinear.quantized_group_apply(folded, x, text_mask, cfg, implementation=impl)
        for name in weights:
            err = float(jnp.max(jnp.abs(got[name] - fake[name])) / jnp.max(jnp.abs(fake[name])))
            assert err < 1e-5, (impl, name)


# ----------------------------------------------------------------------------- CUDA lowering


@pytest.mark.parametrize(
    "m,d,bits,symmetric,main_path,dtype,n_branch",
    [
        (16, 3584, 4, False, "masked", jnp.float32, 6),  # Qwen2.5-VL-7B qkv: 56 x 64 -> 64 x 64
        (1, 18944, 4, True, "gathered", jnp.float32, 2),  # 7B down_proj input, decode
        (130, 2048, 8, True, "masked", jnp.bfloat16, 2),  # 3B hidden, ragged rows, bf16
    ],
)
def test_cuda_lowering(m, d, bits, symmetric, main_path, dtype, n_branch):
    x, kw = make(Case(d, 1, bits, symmetric, main_path,
                      branches=tuple(math.ceil(0.02 * d) + 8 * i for i in range(n_branch))))
    plan, ops = act_api._prepare(jnp.zeros((m, d), dtype), main_path, kw["main_mask"],
                                 kw["main_idx"], kw["transform"], kw["act_clip"], kw["outliers"],
                                 kw["branches"])
    ops = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), ops)
    x = jax.ShapeDtypeStruct((m, d), dtype)

    def f(xx, src, mul, c, factors, clip, groups, lin):
        return act_pack_pallas(xx, src, mul, c, factors, clip, groups, lin, plan=plan,
                               main_bits=bits, aux_bits=max(bits, 4), symmetric=symmetric,
                               block_rows=1 if d > 8192 else 2, interpret=False)

    exp = export_cuda(f, x, *ops)
    text = exp.mlir_module()
    assert text.count(TRITON_CALL) == 1  # the whole activation stage: one kernel
    assert "div.rn.f32" in text
    main_q = exp.out_avals[0]
    assert main_q.shape == (m, plan.n1, plan.n2) and main_q.dtype == jnp.int8
