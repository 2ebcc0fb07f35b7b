"""Pallas (Triton) kernel: the whole activation stage of a split linear group in one pass.

Grid: one program per ``block_rows`` tokens. A program loads its rows of ``x`` once and produces
every operand the split GEMM reads (see :mod:`splitq_jax.pallas.act_pack.reference`):

1. **main path**: the ``(block_rows, p1 * p2)`` tile of main-path channels, gathered from ``x``
   through a column table (``src``: ``i * n2 + j`` when masked, ``main_idx[i * n2 + j]`` when
   gathered), times the channel mask (masked path) and ``c`` (when not folded), viewed as
   ``(block_rows, p1, p2)`` with ``p1 = next_pow2(n1)``, ``p2 = next_pow2(n2)`` (Triton needs
   power-of-two tiles: positions ``i >= n1`` or ``j >= n2`` are masked loads that read zero, and the
   zero-padded factors keep them zero). The Kronecker transform is two small dots, in the order
   ``jnp.einsum`` contracts ``kron_apply`` (``P1`` first: ``Z = P1^T X`` as one
   ``(p1, p1) x (p1, rows * p2)`` dot, then ``Y = Z P2`` as ``(p1 * rows, p2) x (p2, p2)``), then
   the per-token quantization (:class:`splitq_jax.pallas._common.RowQuant`) with the clip;
2. **outlier groups**: gathered columns, ``(rows, k) x (k, k)`` dot with the group's transform,
   quantization at the aux bits with the group's clip;
3. **branches**: the int8 main tile times every down-projection ``L_in`` (all branches of the
   group stacked, ``(r_total, p1 * p2)`` int8 in the padded layout), int32 accumulation, the
   split GEMM's epilogue ``(float32(acc - z * row_sum) * s_x) * s_w``, rounding to the activation
   dtype, and one per-token quantization per branch (its own column segment, its own scale).

Integer outputs (``QuantizedActs``; asymmetric values shifted by ``-2^(b-1)``) are int8, or, with
``main_lanes`` / ``aux_lanes`` 4 (activations of at most 4 bits, ``act_pack(..., packed=True)``),
packed in the kernel to two signed 4-bit lanes per uint8 (:func:`splitq_jax.pallas._common.pack_slots`
on the zero-padded tile, the layout of ``packing.pack(q, 4, uint8, signed=True)``):

* main path: packed along ``p2`` inside each of the ``p1`` tile rows, which is the flat ``K``
  order when ``n2`` is even or ``n1 == 1`` (no transform, or a prime width). Otherwise (odd ``n2``
  with ``n1 > 1``, e.g. some gathered widths) a byte would straddle two tile rows: the kernel stores
  int8 and the caller packs (``Plan.pack_main`` False);
* outlier groups: packed along the group's ``kp`` tile;
* branches: every branch's segment starts at an even column of the stacked tile (``L_in`` padded
  with zero rows to an even rank: ``Plan.branch_offsets``), so each branch's bytes are a contiguous
  slice of the packed output.

Every bit width 2..8 takes the kernel.

Interpret mode (CPU) and bit-exactness: XLA:CPU rounds a float dot's output columns differently
depending on the dot's column count (measured: zero-padding ``N`` from 80 to 96 or 128 changes
results in the last bit; padding ``M`` or the contraction does not). So in interpret mode the two
factor dots and the outlier dot run on the unpadded column count (the padded tile is sliced to
``n2`` / ``k`` before the dot and zero-padded after it; the padded entries are zeros either way, so
the math is the same). This makes the interpreted kernel bit-identical to the reference at every
width the tests cover. The compiled kernel runs the padded dots (IEEE float32: ``HIGHEST``
precision, not TF32); on a GPU its float transform equals XLA's only to float32 round-off.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from splitq_jax.pallas import _common as C

MIN_DOT = 16  # smallest dimension of a Triton dot operand


class GroupSpec(NamedTuple):
    k: int  # channels of the group
    kp: int  # padded tile width
    has_transform: bool
    has_clip: bool


class Plan(NamedTuple):
    """Static shape of one act_pack kernel."""

    n1: int
    n2: int
    p1: int
    p2: int
    kron: bool  # main transform (else identity, n1 == p1 == 1)
    has_mul: bool  # masked path with a channel mask
    has_c: bool  # diag(c) still online
    has_clip: bool
    groups: tuple[tuple[str, GroupSpec], ...]
    branch_sizes: tuple[int, ...]  # rank of each branch, stacked in this order
    r_pad: int  # padded stacked rank
    branch_offsets: tuple[int, ...] = ()  # first column of each branch (multiples of the lanes)
    main_lanes: int = 8  # main output: 8 (int8) or 4 (two 4-bit lanes per uint8)
    aux_lanes: int = 8  # outlier and branch outputs: 8 or 4
    pack_main: bool = True  # main output in main_lanes (False: int8, packed by the caller)

    @property
    def main_per_byte(self) -> int:
        return 8 // self.main_lanes if self.pack_main else 1

    @property
    def aux_per_byte(self) -> int:
        return 8 // self.aux_lanes


def _dot(a, b, contract, out_dtype):
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a, b, (contract, ((), ())), precision=prec, preferred_element_type=out_dtype
    )


def _kron(xv, a, b, n2, interpret):
    """``X (a kron b)`` of ``xv`` ``(rows, p1, p2)`` as ``jnp.einsum`` computes ``kron_apply``."""
    rows, p1, p2 = xv.shape
    w = p2
    if interpret and n2 != p2:  # see the module docstring: XLA:CPU dots depend on N
        xv, b, w = xv[:, :, :n2], b[:n2, :n2], n2
    xt = jnp.transpose(xv, (1, 0, 2)).reshape(p1, rows * w)
    z = _dot(a, xt, ((0,), (0,)), xv.dtype)  # (p1, rows * w): sum_i a[i, p] x[r, i, q]
    y = _dot(z.reshape(p1 * rows, w), b, ((1,), (0,)), xv.dtype)  # (p1 * rows, w)
    y = jnp.transpose(y.reshape(p1, rows, w), (1, 0, 2))
    if w != p2:
        y = jnp.pad(y, ((0, 0), (0, 0), (0, p2 - w)))
    return y


def _dense(xg, p, k, interpret):
    """``xg @ p`` for ``(rows, kp) x (kp, kp)``; unpadded columns in interpret mode."""
    kp = xg.shape[1]
    if interpret and k != kp:
        return jnp.pad(_dot(xg[:, :k], p[:k, :k], ((1,), (0,)), xg.dtype), ((0, 0), (0, kp - k)))
    return _dot(xg, p, ((1,), (0,)), xg.dtype)


def _to_int8(q, zero, shift, valid):
    """Quantized float integers -> int8 operand values (shifted when asymmetric), 0 off ``valid``."""
    qi = q.astype(jnp.int32) - shift
    return jnp.where(valid, qi, 0), (zero.astype(jnp.int32) - shift)


def _act_pack_kernel(*refs, plan: Plan, n_rows, dtype, main_bits, aux_bits, symmetric,
                     precise_asm, interpret):
    it = iter(refs)
    x_ref, src_ref = next(it), next(it)
    mul_ref = next(it) if plan.has_mul else None
    c_ref = next(it) if plan.has_c else None
    a_ref, b_ref = (next(it), next(it)) if plan.kron else (None, None)
    smax_ref, smin_ref = (next(it), next(it)) if plan.has_clip else (None, None)
    g_refs = []
    for _, g in plan.groups:
        gi = next(it)
        gp = next(it) if g.has_transform else None
        gc = (next(it), next(it)) if g.has_clip else (None, None)
        g_refs.append((gi, gp, gc))
    if plan.branch_sizes:
        l_ref, sw_ref, rs_ref = next(it), next(it), next(it)
    qm_ref, sm_ref, zm_ref = next(it), next(it), next(it)
    g_outs = [(next(it), next(it), next(it)) for _ in plan.groups]
    if plan.branch_sizes:
        hq_ref, hs_ref, hz_ref = next(it), next(it), next(it)

    block_rows = x_ref.shape[0]
    p1, p2 = plan.p1, plan.p2
    width = p1 * p2
    local = jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
    row_ok = pl.program_id(0) * block_rows + local < n_rows
    pos = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    pos_ok = ((pos // p2) < plan.n1) & ((pos % p2) < plan.n2)
    valid = row_ok & pos_ok
    main_shift = 0 if symmetric else 1 << (main_bits - 1)
    aux_shift = 0 if symmetric else 1 << (aux_bits - 1)

    def clip_of(refs_):
        if refs_[0] is None:
            return None, None
        return (plgpu.load(refs_[0], mask=row_ok, other=1), plgpu.load(refs_[1], mask=row_ok, other=1))

    # ---- main path: gather, mask, c, Kronecker transform, quantize
    src = plgpu.load(src_ref)
    xv = plgpu.load(x_ref.at[local, src], mask=valid, other=0)
    if plan.has_mul:
        xv = xv * plgpu.load(mul_ref)
    if plan.has_c:
        xv = xv * plgpu.load(c_ref)
    if plan.kron:
        xv = _kron(xv.reshape(block_rows, p1, p2), plgpu.load(a_ref), plgpu.load(b_ref), plan.n2,
                   interpret).reshape(block_rows, width)
    # the transform's output in the activation dtype, as the reference quantizes it (quant.widen)
    y = C.round_to(xv.astype(jnp.float32), dtype, interpret)
    rq = C.RowQuant(main_bits, symmetric, precise_asm)
    scale, zero = rq.row_params(y, valid, *clip_of((smax_ref, smin_ref)))
    qm, zm = _to_int8(rq.quantize(y, scale, zero), zero, main_shift, valid)
    qm8 = qm.astype(jnp.int8)
    if plan.main_per_byte == 1:
        plgpu.store(qm_ref, qm8.reshape(block_rows, p1, p2),
                    mask=jnp.broadcast_to(valid, (block_rows, width)).reshape(block_rows, p1, p2))
    else:  # bytes never straddle tile rows (Plan.pack_main): pack the flat padded tile
        c = plan.main_per_byte
        words = C.pack_slots(qm, plan.main_lanes, c, jnp.uint8)  # (rows, p1 * p2 / c)
        bpos = jax.lax.broadcasted_iota(jnp.int32, (1, width // c), 1)
        bvalid = row_ok & ((bpos // (p2 // c)) < plan.n1) & ((bpos % (p2 // c)) < -(-plan.n2 // c))
        plgpu.store(qm_ref, words.reshape(block_rows, p1, p2 // c),
                    mask=jnp.broadcast_to(bvalid, (block_rows, width // c)).reshape(
                        block_rows, p1, p2 // c))
    plgpu.store(sm_ref, scale, mask=row_ok)
    plgpu.store(zm_ref, zm, mask=row_ok)

    # ---- outlier groups: gather, dense transform, quantize at the aux bits
    for (_, g), (gi_ref, gp_ref, gclip), (q_ref, s_ref, z_ref) in zip(plan.groups, g_refs, g_outs):
        cols = jax.lax.broadcasted_iota(jnp.int32, (1, g.kp), 1)
        gvalid = row_ok & (cols < g.k)
        xg = plgpu.load(x_ref.at[local, plgpu.load(gi_ref)], mask=gvalid, other=0)
        if g.has_transform:
            xg = _dense(xg, plgpu.load(gp_ref), g.k, interpret)
        yg = C.round_to(xg.astype(jnp.float32), dtype, interpret)
        rg = C.RowQuant(aux_bits, symmetric, precise_asm)
        sg, zg = rg.row_params(yg, gvalid, *clip_of(gclip))
        qg, zg = _to_int8(rg.quantize(yg, sg, zg), zg, aux_shift, gvalid)
        if plan.aux_per_byte == 1:
            plgpu.store(q_ref, qg.astype(jnp.int8), mask=gvalid)
        else:
            c = plan.aux_per_byte
            bcols = jax.lax.broadcasted_iota(jnp.int32, (1, g.kp // c), 1)
            plgpu.store(q_ref, C.pack_slots(qg, plan.aux_lanes, c, jnp.uint8),
                        mask=row_ok & (bcols < -(-g.k // c)))
        plgpu.store(s_ref, sg, mask=row_ok)
        plgpu.store(z_ref, zg, mask=row_ok)

    if not plan.branch_sizes:
        return
    # ---- branches: int8 main tile x stacked L_in, the GEMM epilogue, per-branch quantization
    acc = _dot(qm8, plgpu.load(l_ref), ((1,), (1,)), jnp.int32)  # (rows, r_pad)
    if not symmetric:
        acc = acc - zm * plgpu.load(rs_ref)
    h = acc.astype(jnp.float32) * scale * plgpu.load(sw_ref)
    h = C.round_to(h, dtype, interpret)
    rh = C.RowQuant(aux_bits, symmetric, precise_asm)
    rcol = jax.lax.broadcasted_iota(jnp.int32, (1, plan.r_pad), 1)
    n_b = hs_ref.shape[1]
    bcol = jax.lax.broadcasted_iota(jnp.int32, (1, n_b), 1)
    col_scale = jnp.ones((block_rows, plan.r_pad), jnp.float32)
    col_zero = jnp.zeros((block_rows, plan.r_pad), jnp.float32)
    hs = jnp.ones((block_rows, n_b), jnp.float32)
    hz = jnp.zeros((block_rows, n_b), jnp.int32)
    in_seg = None
    for s, (r, off) in enumerate(zip(plan.branch_sizes, plan.branch_offsets)):
        seg = (rcol >= off) & (rcol < off + r)
        in_seg = seg if in_seg is None else in_seg | seg
        sb, zb = rh.row_params(h, row_ok & seg)
        col_scale = jnp.where(seg, sb, col_scale)
        col_zero = jnp.where(seg, zb, col_zero)
        hs = jnp.where(bcol == s, sb, hs)
        hz = jnp.where(bcol == s, zb.astype(jnp.int32) - aux_shift, hz)
    hvalid = row_ok & in_seg  # gaps between aligned segments stay zero
    qh, _ = _to_int8(rh.quantize(h, col_scale, col_zero), col_zero, aux_shift, hvalid)
    if plan.aux_per_byte == 1:
        plgpu.store(hq_ref, qh.astype(jnp.int8), mask=hvalid)
    else:
        c = plan.aux_per_byte
        end = plan.branch_offsets[-1] + plan.branch_sizes[-1]
        bcols = jax.lax.broadcasted_iota(jnp.int32, (1, plan.r_pad // c), 1)
        plgpu.store(hq_ref, C.pack_slots(qh, plan.aux_lanes, c, jnp.uint8),
                    mask=row_ok & (bcols < -(-end // c)))
    bvalid = row_ok & (bcol < len(plan.branch_sizes))
    plgpu.store(hs_ref, hs, mask=bvalid)
    plgpu.store(hz_ref, hz, mask=bvalid)


def act_pack_pallas(
    x: jax.Array,
    src: jax.Array,
    mul: jax.Array | None,
    c: jax.Array | None,
    factors: tuple[jax.Array, jax.Array] | None,
    clip: tuple[jax.Array, jax.Array] | None,
    groups: tuple[tuple[jax.Array, jax.Array | None, tuple | None], ...],
    lin: tuple[jax.Array, jax.Array, jax.Array] | None,
    *,
    plan: Plan,
    main_bits: int,
    aux_bits: int,
    symmetric: bool,
    block_rows: int,
    interpret: bool,
    precise_div: bool | None = None,
):
    """Run the kernel on prepared operands (:func:`splitq_jax.pallas.act_pack.api.prepare`).

    Args:
      x: ``(M, K)`` activations. src: ``(1, p1 * p2)`` int32 source column of each main position.
      mul, c: ``(1, p1 * p2)`` channel mask / diagonal in the activation dtype, or None.
      factors: ``(a (p1, p1), b (p2, p2))`` zero-padded Kronecker factors, or None (identity).
      clip: ``(sig_max, sig_min)`` ``(M, 1)``, or None.
      groups: per outlier group ``(idx (1, kp) int32, p (kp, kp) or None, clip or None)``.
      lin: ``(L (r_pad, p1 * p2) int8, s_w (1, r_pad) float32, row_sum (1, r_pad) int32)`` of
        the stacked branch down-projections, or None.
    Returns:
      ``(main (q (M, n1, n2) int8, s (M, 1), z (M, 1)), [per group (q (M, k), s, z)],
      branches (q (M, r_total) int8, s (M, n_b), z (M, n_b)) or None)``; branch ``b`` occupies
      columns ``[branch_offsets[b], + branch_sizes[b])`` of ``q``. With packed lanes
      (``plan.main_lanes`` / ``aux_lanes`` 4) the integer outputs are uint8 of two 4-bit lanes:
      main ``(M, n1, ceil(n2 / 2))`` (when ``plan.pack_main``), groups ``(M, ceil(k / 2))``,
      branches ``(M, ceil(r_total / 2))``.
    """
    m, k = x.shape
    width = plan.p1 * plan.p2
    if precise_div is None:
        precise_div = not interpret
    full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    rows = lambda w: pl.BlockSpec((block_rows, w), lambda i: (i, 0))  # noqa: E731
    args = [x, src]
    specs = [rows(C.next_pow2(k)), full((1, width))]
    for extra in (mul, c):
        if extra is not None:
            args.append(extra)
            specs.append(full((1, width)))
    if factors is not None:
        args += list(factors)
        specs += [full(factors[0].shape), full(factors[1].shape)]
    if clip is not None:
        args += list(clip)
        specs += [rows(1), rows(1)]
    for (idx, p, gclip), (_, g) in zip(groups, plan.groups):
        args.append(idx)
        specs.append(full((1, g.kp)))
        if p is not None:
            args.append(p)
            specs.append(full((g.kp, g.kp)))
        if gclip is not None:
            args += list(gclip)
            specs += [rows(1), rows(1)]
    if lin is not None:
        args += list(lin)
        specs += [full(lin[0].shape), full((1, plan.r_pad)), full((1, plan.r_pad))]
    cm, ca = plan.main_per_byte, plan.aux_per_byte
    int_dtype = lambda c: jnp.int8 if c == 1 else jnp.uint8  # noqa: E731
    out_shape = [jax.ShapeDtypeStruct((m, plan.n1, -(-plan.n2 // cm)), int_dtype(cm)),
                 jax.ShapeDtypeStruct((m, 1), jnp.float32), jax.ShapeDtypeStruct((m, 1), jnp.int32)]
    out_specs = [pl.BlockSpec((block_rows, plan.p1, plan.p2 // cm), lambda i: (i, 0, 0)), rows(1),
                 rows(1)]
    for _, g in plan.groups:
        out_shape += [jax.ShapeDtypeStruct((m, -(-g.k // ca)), int_dtype(ca)),
                      jax.ShapeDtypeStruct((m, 1), jnp.float32),
                      jax.ShapeDtypeStruct((m, 1), jnp.int32)]
        out_specs += [rows(g.kp // ca), rows(1), rows(1)]
    n_b = len(plan.branch_sizes)
    if n_b:
        n_bp = C.next_pow2(n_b)
        r_end = plan.branch_offsets[-1] + plan.branch_sizes[-1]
        out_shape += [jax.ShapeDtypeStruct((m, -(-r_end // ca)), int_dtype(ca)),
                      jax.ShapeDtypeStruct((m, n_b), jnp.float32),
                      jax.ShapeDtypeStruct((m, n_b), jnp.int32)]
        out_specs += [rows(plan.r_pad // ca), rows(n_bp), rows(n_bp)]
    dtype = jnp.dtype(x.dtype)
    kernel = functools.partial(
        _act_pack_kernel, plan=plan, n_rows=m, dtype=dtype, main_bits=main_bits,
        aux_bits=aux_bits, symmetric=symmetric, precise_asm=precise_div, interpret=interpret,
    )
    tag = f"a{main_bits}x{aux_bits}_{'sym' if symmetric else 'asym'}_k{plan.n1}x{plan.n2}"
    if cm > 1 or ca > 1:
        tag += f"_p{cm}{ca}"
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(pl.cdiv(m, block_rows),),
        in_specs=specs,
        out_specs=tuple(out_specs),
        interpret=interpret,
        compiler_params=C.compiler_params(block_rows * width),
        name=f"act_pack_{tag}",
    )(*args)
    outs = list(outs)
    main = tuple(outs[:3])
    g_out = [tuple(outs[3 + 3 * i: 6 + 3 * i]) for i in range(len(groups))]
    br = tuple(outs[3 + 3 * len(groups):]) if n_b else None
    return main, g_out, br

