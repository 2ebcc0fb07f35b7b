"""Pallas (Triton) kernel: the packed split GEMM with every term and the epilogue in one kernel.

Grid ``(cdiv(M, block_m), cdiv(N, block_n))``; each program owns a ``(block_m, block_n)`` output
tile and computes, for each term ``t`` (main, then the present ones of cws, mac, text, vision):

* an int32 accumulator over ``K_t`` in steps of ``block_k`` (128 for ``K >= 128``: it divides
  every hidden and intermediate size of the target models, 896 ... 18944; smaller terms take
  ``next_pow2(K_t)``, at least 32, in one step without a loop). A step loads an activation tile
  (int8 ``(block_m, block_k)``, or with packed activations ``(block_m, block_k / 2)`` bytes of
  4-bit lanes) and a word tile ``(block_n, block_k / c)`` through ``pl.ds`` slices of the refs
  (Triton cannot slice values), unpacks the ``c`` values of each word with one left shift (slot to
  the top of the word) and one arithmetic right shift (sign extension), in the word's own width
  (int8 for bytes, int32 for uint32 words), reshapes ``(block_n, block_k / c, c)`` to
  ``(block_n, block_k)`` (the little-endian slot order of :mod:`splitq_jax.packing`), unpacks
  packed activation bytes with the same function (:func:`_unpack`: 4-bit lanes are 4-bit weight
  slots), and adds one int8 x int8 -> int32 dot;
* with an asymmetric activation, ``acc -= z_x * row_sum_w``;
* the epilogue ``(float32(acc) * s_x) * s_w``; the MAC term is zeroed on non-text tokens.

The terms are summed in the reference's order, the bias is added, and the tile is stored. Loads
past ``M``, ``N`` or ``K_t`` are masked to zero (Triton does not mask out-of-bounds blocks), so no
operand is padded; masks exist only where a block is ragged (static), so the real shapes' main
loop runs unmasked.

Compiled offline (Triton 3.9, sm_90, no GPU run yet): the dots become ``wgmma ... s32.s8.s8``
(128 x 128 tiles) or ``mma.sync m16n8k32 s8`` (decode tiles); the main K loop is free of register
spills, while the fused auxiliary terms push a 128 x 128 x 8-warp tile to 255 registers and spill
about 2 KB per thread *after* the loop (once per tile).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from splitq_jax.pallas import _common as C

KERNEL_BITS = (2, 4, 8)  # power-of-two values per word (3-bit's 10 per word is not a tile)
WORD_DTYPES = {"uint8": jnp.uint8, "uint32": jnp.uint32}
BLOCK_K = 128
MIN_BLOCK = 16  # smallest M / N tile of a Triton dot
MIN_PROGRAMS = 264  # 2 per SM of an H100 (132 SMs)


X_LANE_BITS = (8, 4)  # activation storage: int8, or two signed 4-bit lanes per uint8


class TermSpec(NamedTuple):
    """Static description of one term of the sum."""

    k: int  # reduction length K_t
    bits: int  # weight bits
    per_word: int  # values per packed word
    block_k: int
    has_zero: bool  # asymmetric activations: subtract z_x * row_sum
    token_masked: bool  # MAC: text tokens only
    x_lane_bits: int = 8  # activation lanes: 8 (int8 values) or 4 (packed uint8)

    @property
    def x_per_word(self) -> int:
        return 8 // self.x_lane_bits


def term_spec(k: int, bits: int, word_dtype: str, has_zero: bool, token_masked: bool,
              x_lane_bits: int = 8) -> TermSpec:
    per_word = jnp.dtype(WORD_DTYPES[word_dtype]).itemsize * 8 // bits
    block_k = BLOCK_K if k >= BLOCK_K else max(32, C.next_pow2(k))
    return TermSpec(k, bits, per_word, block_k, has_zero, token_masked, x_lane_bits)


def default_blocks(m: int, n: int) -> tuple[int, int]:
    """``(block_m, block_n)``, powers of two of at least 16.

    Many tokens: 128 x 128 tiles (int8 wgmma on Hopper), down to 64 x 64 while there are fewer
    than about two programs per H100 SM (``MIN_PROGRAMS``). Few tokens (decode, memory bound): the
    M tile just covers the tokens and the N tile narrows from 64 to 16 by the same rule, so that
    the weight stream is spread over the GPU. (Untuned: no GPU measurements yet.)
    """
    def programs(bm, bn):
        return -(-m // bm) * -(-n // bn)

    n_cap = max(MIN_BLOCK, C.next_pow2(n))
    if m > 64:
        block_m, block_n = 128, min(128, n_cap)
        if programs(block_m, block_n) < MIN_PROGRAMS and block_n > 64:
            block_n = 64
        if programs(block_m, block_n) < MIN_PROGRAMS:
            block_m = 64
        return block_m, block_n
    block_m = max(MIN_BLOCK, C.next_pow2(m))
    block_n = min(64, n_cap)
    while block_n > MIN_BLOCK and programs(block_m, block_n) < MIN_PROGRAMS:
        block_n //= 2
    return block_m, block_n


def _unpack(words: jax.Array, bits: int, per_word: int) -> jax.Array:
    """``(rows, w)`` words -> ``(rows, w * per_word)`` int8 signed values (slot k of word j is
    value ``j * per_word + k``)."""
    rows, n_words = words.shape
    # Shift in the word's own width (uint8 -> int8, uint32 -> int32: same bits), so a byte tile
    # never widens to 32 bits in registers.
    itype = jnp.int8 if words.dtype == jnp.uint8 else jnp.int32
    width = jnp.iinfo(itype).bits
    v = words.astype(itype)
    if per_word == 1:
        return v.astype(jnp.int8)  # 8-bit values in bytes: the byte is the value
    slot = jax.lax.broadcasted_iota(itype, (1, 1, per_word), 2)
    top = jnp.left_shift(v[:, :, None], (width - bits * (slot + 1)).astype(itype))  # slot on top
    vals = jnp.right_shift(top, itype(width - bits))  # arithmetic: sign-extends
    return vals.reshape(rows, n_words * per_word).astype(jnp.int8)


def _and(a, b):
    return b if a is None else (a if b is None else a & b)


def _accumulate(x_ref, w_ref, spec: TermSpec, row_ok, col_ok):
    """int32 ``(block_m, block_n)`` sum over ``K_t`` of ``q_x q_w``.

    ``row_ok`` ``(block_m, 1)`` / ``col_ok`` ``(block_n, 1)``: valid rows of the activation and
    weight tiles, or None where every tile is whole. Masks are built inside the step from
    broadcast iotas: loop-invariant full-tile masks would stay live in registers across the loop.
    """
    block_m, block_n = x_ref.shape[0], w_ref.shape[0]
    bk = spec.block_k
    bw = bk // spec.per_word
    bx = bk // spec.x_per_word  # activation bytes per step
    n_words = -(-spec.k // spec.per_word)
    n_x = -(-spec.k // spec.x_per_word)
    ragged = spec.k % bk != 0

    def step(s, acc):
        x0 = s * bx if isinstance(s, int) else pl.multiple_of(s * bx, bx)
        w0 = s * bw if isinstance(s, int) else pl.multiple_of(s * bw, bw)
        xm, wm = row_ok, col_ok
        if ragged:
            xm = _and(xm, x0 + jax.lax.broadcasted_iota(jnp.int32, (1, bx), 1) < n_x)
            wm = _and(wm, w0 + jax.lax.broadcasted_iota(jnp.int32, (1, bw), 1) < n_words)
        if xm is not None:
            xm = jnp.broadcast_to(xm, (block_m, bx))
        if wm is not None:
            wm = jnp.broadcast_to(wm, (block_n, bw))
        x = plgpu.load(x_ref.at[:, pl.ds(x0, bx)], mask=xm, other=None if xm is None else 0)
        if spec.x_per_word > 1:  # packed lanes (an odd K's pad lane is 0, its weight too)
            x = _unpack(x, spec.x_lane_bits, spec.x_per_word)
        words = plgpu.load(w_ref.at[:, pl.ds(w0, bw)], mask=wm, other=None if wm is None else 0)
        w = _unpack(words, spec.bits, spec.per_word)
        return acc + jax.lax.dot_general(
            x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
        )

    n_steps = -(-spec.k // bk)
    acc = jnp.zeros((block_m, block_n), jnp.int32)
    if n_steps == 1:  # small terms: no loop for Triton to pipeline (it would only add registers)
        return step(0, acc)
    return jax.lax.fori_loop(0, n_steps, step, acc)


def _split_gemm_kernel(*refs, specs, n_rows, n_cols, has_bias):
    refs = list(refs)
    o_ref = refs.pop()
    bias_ref = refs.pop() if has_bias else None
    mask_ref = refs.pop() if any(s.token_masked for s in specs) else None
    block_m, block_n = o_ref.shape
    rows = pl.program_id(0) * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    cols = pl.program_id(1) * block_n + jax.lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
    row_ok = rows < n_rows  # (block_m, 1)
    col_ok = cols < n_cols  # (1, block_n)
    # Masks of the operand tiles only where the last block is ragged (static).
    x_rows_ok = row_ok if n_rows % block_m else None
    w_rows_ok = None
    if n_cols % block_n:
        w_rows_ok = pl.program_id(1) * block_n + jax.lax.broadcasted_iota(
            jnp.int32, (block_n, 1), 0
        ) < n_cols

    y = None
    it = iter(refs)
    for spec in specs:
        x_ref, w_ref, sx_ref = next(it), next(it), next(it)
        zx_ref = next(it) if spec.has_zero else None
        sw_ref = next(it)
        wsum_ref = next(it) if spec.has_zero else None
        acc = _accumulate(x_ref, w_ref, spec, x_rows_ok, w_rows_ok)
        if spec.has_zero:
            zx = plgpu.load(zx_ref, mask=row_ok, other=0)
            acc = acc - zx * plgpu.load(wsum_ref, mask=col_ok, other=0)
        sx = plgpu.load(sx_ref, mask=row_ok, other=0.0)
        sw = plgpu.load(sw_ref, mask=col_ok, other=0.0)
        t = acc.astype(jnp.float32) * sx * sw
        if spec.token_masked:
            t = jnp.where(plgpu.load(mask_ref, mask=row_ok, other=0) != 0, t, 0.0)
        y = t if y is None else y + t
    if has_bias:
        y = y + plgpu.load(bias_ref, mask=col_ok, other=0.0)
    plgpu.store(o_ref, y.astype(o_ref.dtype), mask=row_ok & col_ok)


def compiler_params(block_m: int, block_n: int) -> plgpu.CompilerParams:
    """Triton parameters (passing them selects the Triton backend, not Mosaic GPU); 3 stages let
    Triton pipeline the K loop's loads."""
    return plgpu.CompilerParams(num_warps=4 if block_m * block_n <= 64 * 64 else 8, num_stages=3)


@functools.partial(
    jax.jit,
    static_argnames=(
        "bits", "word_dtypes", "token_masked", "x_lane_bits", "ks", "out_dtype", "block_m",
        "block_n", "interpret",
    ),
)
def split_gemm_pallas(
    xs: tuple[jax.Array, ...],
    x_scales: tuple[jax.Array, ...],
    x_zeros: tuple[jax.Array | None, ...],
    words: tuple[jax.Array, ...],
    w_scales: tuple[jax.Array, ...],
    w_sums: tuple[jax.Array, ...],
    text_mask: jax.Array | None,
    bias: jax.Array | None,
    *,
    bits: tuple[int, ...],
    word_dtypes: tuple[str, ...],
    token_masked: tuple[bool, ...],
    x_lane_bits: tuple[int, ...] | None = None,
    ks: tuple[int, ...] | None = None,
    out_dtype=jnp.float32,
    block_m: int | None = None,
    block_n: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Sum over terms of dequantized activation x packed-weight products, plus bias; forward only.

    Args (one tuple entry per term, the main term first, then in the order they are added):
      xs: ``(M, K_t)`` int8 activations, or ``(M, ceil(K_t / 2))`` uint8 of two signed 4-bit lanes
        (``x_lane_bits`` 4; the layout of :class:`~splitq_jax.pallas.split_gemm.QuantizedActs`).
      x_scales: ``(M, 1)`` float32. x_zeros: ``(M, 1)`` int32, or None (symmetric).
      words: ``(N, ceil(K_t / c))`` uint8 / uint32 packed signed weights.
      w_scales: ``(1, N)`` float32. w_sums: ``(1, N)`` int32 row sums (read with a zero point).
      text_mask: ``(M, 1)`` int32 (nonzero: text token), needed by token-masked terms.
      bias: ``(1, N)`` float32 or None.
      bits, word_dtypes, token_masked: static, per term.
      x_lane_bits: static, per term: 8 (int8) or 4 (packed); None: all 8.
      ks: static, per term: ``K_t`` (needed with packed activations); None: ``xs[t].shape[1]``.
      block_m, block_n: output tile (powers of two, at least 16); defaults from the shape.
      interpret: run with the Pallas interpreter (CPU).
    Returns:
      ``(M, N)`` of ``out_dtype``.
    """
    n_terms = len(xs)
    x_lane_bits = (8,) * n_terms if x_lane_bits is None else tuple(x_lane_bits)
    ks = tuple(x.shape[1] for x in xs) if ks is None else tuple(ks)
    for seq in (x_scales, x_zeros, words, w_scales, w_sums, bits, word_dtypes, token_masked,
                x_lane_bits, ks):
        if len(seq) != n_terms:
            raise ValueError("every per-term argument needs one entry per term")
    m = xs[0].shape[0]
    n = words[0].shape[0]
    dm, dn = default_blocks(m, n)
    block_m = C.check_block_rows(dm if block_m is None else block_m)
    block_n = C.check_block_rows(dn if block_n is None else block_n)
    if min(block_m, block_n) < MIN_BLOCK:
        raise ValueError(f"block_m and block_n must be at least {MIN_BLOCK} (Triton dot tiles)")
    specs, args, in_specs = [], [], []
    row_spec = pl.BlockSpec((block_m, 1), lambda i, j: (i, 0))
    col_spec = pl.BlockSpec((1, block_n), lambda i, j: (0, j))
    for x, sx, zx, wd, sw, ws, b, wdt, masked, xl, k in zip(
        xs, x_scales, x_zeros, words, w_scales, w_sums, bits, word_dtypes, token_masked,
        x_lane_bits, ks,
    ):
        if b not in KERNEL_BITS or wdt not in WORD_DTYPES:
            raise ValueError(f"split_gemm kernel packs {KERNEL_BITS} bits in {tuple(WORD_DTYPES)}")
        if xl not in X_LANE_BITS:
            raise ValueError(f"activation lanes must be one of {X_LANE_BITS} bits, got {xl}")
        x_dtype = jnp.int8 if xl == 8 else jnp.uint8
        if x.dtype != x_dtype or wd.dtype != WORD_DTYPES[wdt]:
            raise ValueError(
                f"expected {jnp.dtype(x_dtype).name} activations and {wdt} words, got {x.dtype} "
                f"and {wd.dtype}"
            )
        if x.shape[0] != m or wd.shape[0] != n:
            raise ValueError(f"term shapes {x.shape} x {wd.shape} do not fit ({m}, {n})")
        spec = term_spec(k, b, wdt, zx is not None, masked, xl)
        if x.shape[1] != -(-spec.k // spec.x_per_word):
            raise ValueError(f"{x.shape[1]} activation columns do not hold K={spec.k} "
                             f"in {xl}-bit lanes")
        if wd.shape[1] != -(-spec.k // spec.per_word):
            raise ValueError(f"{wd.shape[1]} words do not hold K={spec.k} {b}-bit values")
        specs.append(spec)
        steps = -(-spec.k // spec.block_k)
        # Blocks span the whole (padded) K; the kernel walks it in block_k slices.
        args += [x, wd]
        in_specs += [
            pl.BlockSpec((block_m, steps * spec.block_k // spec.x_per_word), lambda i, j: (i, 0)),
            pl.BlockSpec((block_n, steps * spec.block_k // spec.per_word), lambda i, j: (j, 0)),
        ]
        args.append(sx)
        in_specs.append(row_spec)
        if zx is not None:
            args.append(zx)
            in_specs.append(row_spec)
        args.append(sw)
        in_specs.append(col_spec)
        if zx is not None:
            args.append(ws)
            in_specs.append(col_spec)
    if any(token_masked):
        if text_mask is None:
            raise ValueError("a token-masked term needs text_mask")
        args.append(text_mask)
        in_specs.append(row_spec)
    if bias is not None:
        args.append(bias)
        in_specs.append(col_spec)
    kernel = functools.partial(
        _split_gemm_kernel, specs=tuple(specs), n_rows=m, n_cols=n, has_bias=bias is not None
    )
    tag = "_".join(f"{'p' if s.x_per_word > 1 else ''}w{s.bits}k{s.k}{'z' if s.has_zero else ''}"
                   for s in specs)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=compiler_params(block_m, block_n),
        name=f"split_gemm_{tag}",
    )(*args)
