"""Public split GEMM: ``implementation=None | "xla" | "pallas"`` (inference only)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from splitq_jax.pallas import _common as C
from splitq_jax.pallas.split_gemm.kernel import KERNEL_BITS, split_gemm_pallas
from splitq_jax.pallas.split_gemm.operands import (
    TERMS,
    GemmWeight,
    QuantizedActs,
    check_operands,
)
from splitq_jax.pallas.split_gemm.reference import split_gemm_xla


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "interpret"))
def _split_gemm_pallas_jit(x, w, terms, text_mask, bias, *, out_dtype, block_m, block_n, interpret):
    rows = x.qvalue.shape[:-1]
    m = 1
    for r in rows:
        m *= r
    pairs = [(x, w)] + [terms[name] for name in TERMS if name in terms]
    masked = (False,) + tuple(name == "mac" for name in TERMS if name in terms)
    y = split_gemm_pallas(
        tuple(a.qvalue.reshape(m, -1) for a, _ in pairs),
        tuple(a.scale.reshape(m, 1).astype(jnp.float32) for a, _ in pairs),
        tuple(None if a.zero_point is None else a.zero_point.reshape(m, 1) for a, _ in pairs),
        tuple(b.qvalue for _, b in pairs),
        tuple(b.scale.reshape(1, -1) for _, b in pairs),
        tuple(b.row_sum.reshape(1, -1) for _, b in pairs),
        None if text_mask is None else text_mask.reshape(m, 1).astype(jnp.int32),
        None if bias is None else jnp.asarray(bias, jnp.float32).reshape(1, -1),
        bits=tuple(b.bits for _, b in pairs),
        word_dtypes=tuple(b.word_dtype for _, b in pairs),
        token_masked=masked,
        x_lane_bits=tuple(a.lane_bits for a, _ in pairs),
        ks=tuple(a.width for a, _ in pairs),
        out_dtype=out_dtype,
        block_m=block_m,
        block_n=block_n,
        interpret=interpret,
    )
    return y.reshape(*rows, w.n)


def split_gemm(
    x: QuantizedActs,
    w: GemmWeight,
    *,
    cws: tuple[QuantizedActs, GemmWeight] | None = None,
    mac: tuple[QuantizedActs, GemmWeight] | None = None,
    text: tuple[QuantizedActs, GemmWeight] | None = None,
    vision: tuple[QuantizedActs, GemmWeight] | None = None,
    text_mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype=jnp.float32,
    implementation: str | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """One split linear (spec Eq. 13-19) from quantized operands, in one kernel.

    ``y = s_x s_w (q_x . q_w - z_x sum_k q_w)`` for the main path, plus the same for each given
    auxiliary term (own activations, weights and scales), plus ``bias``::

        y = main + cws + [text tokens] mac + text + vision + bias

    Args:
      x: main-path activations ``(..., K)`` (per-token, :class:`QuantizedActs`: int8, or packed
        4-bit lanes, unpacked in the kernel; each term may use either format).
      w: main weight ``(N, K)`` (the residual ``R^T`` at ``b`` bits, :class:`GemmWeight`).
      cws, mac: ``(h, l_out)``: the branch's quantized rank-``r`` activations ``h = Q(x_hat L_in)``
        ``(..., r)`` and its up-projection ``(N, r)``.
      text, vision: ``(x_g, w_g)``: quantized transformed outlier activations ``(..., K_g)`` and
        the outlier weight ``(N, K_g)``.
      text_mask: ``(...)`` bool, True on text tokens; required with ``mac`` (it adds only there).
      bias: ``(N,)`` or None.
      out_dtype: output dtype (the epilogue computes in float32).
      implementation: ``"pallas"`` (kernel), ``"xla"`` (reference) or None: Pallas on GPU, XLA
        elsewhere. Weights of other widths than 2, 4, 8 bits (3-bit) run the reference.
      block_m, block_n: output tile of the kernel (powers of two, >= 16), None for the default.
      interpret: Pallas interpreter; default on when not running on a GPU.
    Returns:
      ``(..., N)`` of ``out_dtype``.
    """
    terms = {k: v for k, v in zip(TERMS, (cws, mac, text, vision)) if v is not None}
    check_operands(x, w, terms, text_mask, bias)
    impl = C.resolve_implementation(implementation)
    kernel_ok = all(b.bits in KERNEL_BITS for b in [w, *(p[1] for p in terms.values())])
    if impl == "xla" or not kernel_ok or x.scale.size == 0 or x.width == 0 or w.n == 0:
        return split_gemm_xla(
            x, w, **terms, text_mask=text_mask, bias=bias, out_dtype=jnp.dtype(out_dtype)
        )
    return _split_gemm_pallas_jit(
        x,
        w,
        terms,
        text_mask,
        bias,
        out_dtype=jnp.dtype(out_dtype),
        block_m=block_m,
        block_n=block_n,
        interpret=C.resolve_interpret(interpret),
    )
