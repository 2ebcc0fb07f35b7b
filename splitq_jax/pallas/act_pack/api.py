"""Public activation-stage op: ``implementation=None | "xla" | "pallas"`` (inference only).

Which inputs take the kernel (``implementation="pallas"``), and which the XLA reference:

* kernel: the main transform is None (identity) or a Kronecker ``{"p1", "p2"[, "c"]}`` of any
  factor sizes ``n1 x n2`` (non-power-of-two factors are zero-padded to ``next_pow2`` inside the
  kernel with masked loads: e.g. 3584 = 56 x 64 -> 64 x 64 tile, 5120 = 64 x 80 -> 64 x 128,
  11008 = 86 x 128 -> 128 x 128, 13824 = 108 x 128 -> 128 x 128, 18944 = 128 x 148 -> 128 x 256);
  outlier transforms None or dense ``{"p"}``; every bit width 2..8; float32 / bfloat16 / float16.
* reference, explicitly: a dense main transform ``{"p"}``; a Kronecker transform whose
  ``jnp.einsum`` path would contract ``P2`` first (never the case for ``kron_factors`` widths:
  ``n1 <= n2``, checked at trace time); no rows (``M == 0``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import packing
from splitq_jax import transforms as tf
from splitq_jax.pallas import _common as C
from splitq_jax.pallas.act_pack import kernel as K
from splitq_jax.pallas.act_pack.reference import ActPacked, OutlierGroup, act_pack_xla
from splitq_jax.pallas.split_gemm.operands import (
    GemmWeight,
    QuantizedActs,
    act_lane_bits,
    pack_acts,
)
from splitq_jax.quant import check_bits

Tree = dict[str, Any]


@functools.lru_cache(maxsize=None)
def p1_contracted_first(m: int, n1: int, n2: int, dtype: str) -> bool:
    """Whether ``jnp.einsum`` in :func:`splitq_jax.transforms.kron_apply` contracts ``P1`` first
    for ``m`` rows (the kernel reproduces that order; the other order runs the reference)."""
    sds = jax.ShapeDtypeStruct
    jaxpr = jax.make_jaxpr(tf.kron_apply)(
        sds((m, n1 * n2), dtype), sds((n1, n1), dtype), sds((n2, n2), dtype)
    ).jaxpr
    first = next(e for e in jaxpr.eqns if e.primitive.name == "dot_general")
    return any(v is jaxpr.invars[1] for v in first.invars)


def _pad2(a, rows, cols):
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _main_width(k: int, main_path: str, main_idx) -> int:
    return int(main_idx.shape[0]) if main_path == "gathered" else k


def kernel_path(x_shape, dtype, main_path, main_idx, transform) -> str | None:
    """None when the kernel takes these inputs, else why the reference runs."""
    m = int(np.prod(x_shape[:-1], dtype=np.int64))
    if m == 0:
        return "no rows"
    if transform is None:
        return None
    if "p" in transform:
        return "dense main transform"
    n1, n2 = int(transform["p1"].shape[0]), int(transform["p2"].shape[0])
    if not p1_contracted_first(m, n1, n2, jnp.dtype(dtype).name):
        return "einsum contracts P2 first"
    return None


def _check(x, main_bits, aux_bits, main_path, main_mask, main_idx, transform, outliers, branches):
    C.check_input(x.reshape(-1, x.shape[-1]) if x.ndim else x, "act_pack")
    check_bits(main_bits)
    check_bits(aux_bits)
    d = x.shape[-1]
    if main_path not in ("masked", "gathered"):
        raise ValueError(f"main_path must be 'masked' or 'gathered', got {main_path!r}")
    if main_path == "gathered" and main_idx is None:
        raise ValueError("the gathered main path needs main_idx")
    if main_path == "masked" and main_mask is not None and tuple(main_mask.shape) != (d,):
        raise ValueError(f"main_mask must have shape {(d,)}, got {tuple(main_mask.shape)}")
    km = _main_width(d, main_path, main_idx)
    if transform is not None and "p" not in transform:
        n1, n2 = int(transform["p1"].shape[0]), int(transform["p2"].shape[0])
        if n1 * n2 != km:
            raise ValueError(f"Kronecker factors {n1} x {n2} do not cover the main width {km}")
        if "c" in transform and tuple(transform["c"].shape) != (km,):
            raise ValueError(f"transform['c'] must have shape {(km,)}")
    for name, g in (outliers or {}).items():
        if not isinstance(g, OutlierGroup):
            raise TypeError(f"outlier group {name!r}: expected an OutlierGroup")
        kg = int(g.idx.shape[0])
        if g.transform is not None and tuple(g.transform["p"].shape) != (kg, kg):
            raise ValueError(f"outlier group {name!r}: transform must be ({kg}, {kg})")
    for name, w in (branches or {}).items():
        if not isinstance(w, GemmWeight):
            raise TypeError(f"branch {name!r}: expected a GemmWeight (the packed l_in)")
        if w.k != km:
            raise ValueError(f"branch {name!r}: l_in has K={w.k}, the main path has {km}")


def _prepare(x2, main_path, main_mask, main_idx, transform, act_clip, outliers, branches,
             main_lanes=8, aux_lanes=8):
    """Kernel operands and static plan (all small XLA ops on weights / index tables).

    ``main_lanes`` / ``aux_lanes``: 8 (int8 outputs) or 4 (packed 4-bit lanes, see the kernel)."""
    m, d = x2.shape
    dtype = x2.dtype
    km = _main_width(d, main_path, main_idx)
    kron = transform is not None
    n1, n2 = (int(transform["p1"].shape[0]), int(transform["p2"].shape[0])) if kron else (1, km)
    p1 = max(K.MIN_DOT, C.next_pow2(n1)) if kron else 1
    p2 = max(K.MIN_DOT, C.next_pow2(n2)) if kron else C.next_pow2(n2)
    ii, jj = np.meshgrid(np.arange(p1), np.arange(p2), indexing="ij")
    ok = ((ii < n1) & (jj < n2)).reshape(1, -1)
    flat = np.where(ok, ii.reshape(1, -1) * n2 + jj.reshape(1, -1), 0).astype(np.int32)

    def spread(v):  # (km,) per main channel -> (1, p1 * p2) padded layout, zeros outside
        return jnp.where(ok, jnp.asarray(v)[flat], 0).astype(dtype)

    src = jnp.asarray(flat)
    if main_path == "gathered":
        src = jnp.where(ok, jnp.asarray(main_idx, jnp.int32)[flat], 0)
    mul = spread(main_mask) if main_path == "masked" and main_mask is not None else None
    c = spread(transform["c"]) if kron and "c" in transform else None
    factors = None
    if kron:
        factors = (_pad2(transform["p1"].astype(dtype), p1, p1),
                   _pad2(transform["p2"].astype(dtype), p2, p2))
    clip = None if act_clip is None else C.clip_factors(act_clip, (m,))
    groups, gspecs = [], []
    for name, g in (outliers or {}).items():
        kg = int(g.idx.shape[0])
        kp = max(K.MIN_DOT, C.next_pow2(kg))
        idx = _pad2(jnp.asarray(g.idx, jnp.int32).reshape(1, -1), 1, kp)
        p = None if g.transform is None else _pad2(g.transform["p"].astype(dtype), kp, kp)
        groups.append((idx, p, None if g.clip is None else C.clip_factors(g.clip, (m,))))
        gspecs.append((name, K.GroupSpec(kg, kp, p is not None, g.clip is not None)))
    lin, sizes, r_pad = None, (), 0
    if branches:
        mats, sws, rss = [], [], []
        align = 8 // aux_lanes  # packed: every branch starts on a byte boundary
        sizes, offsets, off = [], [], 0
        for w in branches.values():
            q = packing.unpack(w.qvalue, w.bits, w.k, w.word_dtype, signed=True).astype(jnp.int8)
            q = jnp.pad(q.reshape(-1, n1, n2), ((0, 0), (0, p1 - n1), (0, p2 - n2)))
            r = int(q.shape[0])
            gap = -r % align  # zero rows of L_in: their columns are masked out in the kernel
            mats.append(jnp.pad(q.reshape(r, p1 * p2), ((0, gap), (0, 0))))
            sws.append(jnp.pad(w.scale, (0, gap)))
            rss.append(jnp.pad(w.row_sum, (0, gap)))
            sizes.append(r)
            offsets.append(off)
            off += r + gap
        sizes, offsets = tuple(sizes), tuple(offsets)
        r_pad = max(K.MIN_DOT, C.next_pow2(off))
        lin = (_pad2(jnp.concatenate(mats), r_pad, p1 * p2),
               _pad2(jnp.concatenate(sws).astype(jnp.float32).reshape(1, -1), 1, r_pad),
               _pad2(jnp.concatenate(rss).astype(jnp.int32).reshape(1, -1), 1, r_pad))
    cm = 8 // main_lanes
    pack_main = cm == 1 or ((n1 == 1 or n2 % cm == 0) and p2 % cm == 0)
    plan = K.Plan(n1, n2, p1, p2, kron, mul is not None, c is not None, clip is not None,
                  tuple(gspecs), sizes, r_pad, offsets if branches else (), main_lanes, aux_lanes,
                  pack_main)
    return plan, (src, mul, c, factors, clip, tuple(groups), lin)


@functools.partial(
    jax.jit,
    static_argnames=("main_bits", "aux_bits", "symmetric", "main_path", "packed", "block_rows",
                     "interpret"),
)
def _act_pack_pallas_jit(x, main_mask, main_idx, transform, act_clip, outliers, branches, *,
                         main_bits, aux_bits, symmetric, main_path, packed, block_rows, interpret):
    rows = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    main_lanes = act_lane_bits(main_bits) if packed else 8
    aux_lanes = act_lane_bits(aux_bits) if packed else 8
    plan, ops = _prepare(x2, main_path, main_mask, main_idx, transform, act_clip, outliers,
                         branches, main_lanes, aux_lanes)
    m = x2.shape[0]
    if block_rows is None:
        block_rows = C.default_block_rows(m, plan.p1 * plan.p2)
    (qm, sm, zm), g_out, br = K.act_pack_pallas(
        x2, *ops, plan=plan, main_bits=main_bits, aux_bits=aux_bits, symmetric=symmetric,
        block_rows=block_rows, interpret=interpret,
    )

    def acts(q, s, z, k, lanes):
        return QuantizedActs(q.reshape(*rows, -1), s.reshape(rows),
                             None if symmetric else z.reshape(rows), lanes,
                             None if lanes == 8 else k)

    km = plan.n1 * plan.n2
    if plan.pack_main:
        main = acts(qm, sm, zm, km, main_lanes)
    else:  # odd n2: the kernel stored int8 (bytes would straddle its tile rows); pack here
        main = pack_acts(acts(qm, sm, zm, km, 8), main_lanes)
    groups = {name: acts(*o, g.k, aux_lanes) for (name, g), o in zip(plan.groups, g_out)}
    hs = {}
    if br is not None:
        hq, hsc, hz = br
        c = 8 // aux_lanes
        for i, (name, r, off) in enumerate(zip(branches, plan.branch_sizes,
                                                plan.branch_offsets)):
            hs[name] = acts(hq[:, off // c:(off + r + c - 1) // c], hsc[:, i], hz[:, i], r,
                            aux_lanes)
    return ActPacked(main, groups, hs)


def act_pack(
    x: jax.Array,
    *,
    main_bits: int,
    aux_bits: int,
    symmetric: bool = True,
    main_path: str = "masked",
    main_mask: jax.Array | None = None,
    main_idx: jax.Array | None = None,
    transform: Tree | None = None,
    act_clip: Tree | None = None,
    outliers: dict[str, OutlierGroup] | None = None,
    branches: dict[str, GemmWeight] | None = None,
    packed: bool = False,
    implementation: str | None = None,
    block_rows: int | None = None,
    interpret: bool | None = None,
) -> ActPacked:
    """Every activation operand of a split linear group's GEMMs from ``x``, in one pass.

    Args:
      x: ``(..., d)`` group input (float32 / bfloat16 / float16).
      main_bits, aux_bits: activation bits of the main path and of the auxiliary operands
        (outlier groups and branch intermediates).
      symmetric: symmetric (int8 values) or asymmetric (shifted values and zero points).
      main_path: ``"masked"`` (full width, ``x * main_mask``) or ``"gathered"`` (``x[..., main_idx]``).
      transform: the main transform: None, or Kronecker ``{"p1", "p2"}`` (+ ``"c"`` if unfolded)
        of the main width; ``{"p"}`` (dense) runs the reference.
      act_clip: the main path's clipping logits ``{"max", "min"}`` (scalar or per token) or None.
      outliers: ``{group: OutlierGroup(idx, transform, clip)}``.
      branches: ``{name: l_in}``: the packed down-projections (``GemmWeight`` ``(r, K_main)``)
        whose intermediates ``Q(Q(x_main P) L_in^T)`` are wanted, e.g. every CWS and MAC of the
        group's linears.
      packed: store the integers as :func:`~splitq_jax.pallas.split_gemm.act_lane_bits` lanes
        (:class:`QuantizedActs` ``lane_bits=4``: two signed 4-bit lanes per uint8 for 2..4-bit
        activations, half the bytes; 5..8-bit ones stay int8), each output by its own bit width;
        False (default): int8. Same integers either way, so the GEMM results are identical.
      implementation: ``"pallas"``, ``"xla"`` or None (Pallas on GPU, XLA elsewhere).
      block_rows: tokens per kernel program (power of two), None for the default.
      interpret: Pallas interpreter; default on when not running on a GPU.
    Returns:
      :class:`ActPacked` ``(main, outliers, branches)`` of :class:`QuantizedActs`.
    """
    outliers = dict(outliers or {})
    branches = dict(branches or {})
    _check(x, main_bits, aux_bits, main_path, main_mask, main_idx, transform, outliers, branches)
    impl = C.resolve_implementation(implementation)
    kw = dict(main_bits=main_bits, aux_bits=aux_bits, symmetric=bool(symmetric),
              main_path=main_path, packed=bool(packed))
    if impl == "xla" or kernel_path(x.shape, x.dtype, main_path, main_idx, transform) is not None:
        return act_pack_xla(x, main_mask=main_mask, main_idx=main_idx, transform=transform,
                            act_clip=act_clip, outliers=outliers, branches=branches, **kw)
    return _act_pack_pallas_jit(
        x, main_mask, main_idx, transform, act_clip, outliers, branches, **kw,
        block_rows=None if block_rows is None else C.check_block_rows(block_rows),
        interpret=C.resolve_interpret(interpret),
    )
