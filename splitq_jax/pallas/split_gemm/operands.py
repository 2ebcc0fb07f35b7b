"""Operands of the split GEMM: per-token int8 activations and packed weights with row sums.

Both containers are pytrees (jit-friendly) and hold exactly what the kernel reads:

* :class:`QuantizedActs`: ``x ~= scale[..., None] * (qvalue - zero_point[..., None])`` with
  ``qvalue`` int8. Asymmetric ``b``-bit values ``q`` in ``[0, 2^b)`` are stored shifted to signed,
  ``q - 2^(b-1)``, and so is the zero point: the difference ``q - z`` is unchanged, and an
  unsigned 8-bit value (up to 255) fits the int8 operand of an int8 x int8 -> int32 dot.
* :class:`GemmWeight`: a symmetric per-output-channel :class:`~splitq_jax.packing.PackedTensor`
  (``W ~= scale[:, None] * q``) plus ``row_sum = sum_k q`` (int32), computed once when the weight
  is prepared, because an asymmetric activation needs it:
  ``sum_k (q_x - z_x) q_w = q_x . q_w - z_x * row_sum``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import packing, quant

TERMS = ("cws", "mac", "text", "vision")  # auxiliary terms, in the order they are added


@dataclasses.dataclass(frozen=True)
class QuantizedActs:
    """Per-token quantized activations ``(..., K)``.

    Leaves:
      qvalue: ``(..., K)`` int8 (signed values; asymmetric ones shifted by ``-2^(b-1)``).
      scale: ``(...)`` float32.
      zero_point: ``(...)`` int32 in the same shifted domain, or None (symmetric).
    """

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None


jax.tree_util.register_dataclass(
    QuantizedActs, data_fields=["qvalue", "scale", "zero_point"], meta_fields=[]
)


def quantized_acts(p: quant.QParams, bits: int, symmetric: bool) -> QuantizedActs:
    """Convert the output of :func:`splitq_jax.quant.quantize` (no groups) to int8 operands."""
    quant.check_bits(bits)
    q = jnp.asarray(p.qvalue, jnp.int32)
    scale = jnp.asarray(p.scale, jnp.float32)[..., 0]
    if symmetric:
        return QuantizedActs(q.astype(jnp.int8), scale, None)
    shift = 1 << (bits - 1)
    zero = jnp.asarray(p.zero_point, jnp.int32)[..., 0] - shift
    return QuantizedActs((q - shift).astype(jnp.int8), scale, zero)


def quantize_acts(
    x: jax.Array, bits: int, *, symmetric: bool = True, clip: dict[str, jax.Array] | None = None
) -> QuantizedActs:
    """Per-token quantization of ``x`` ``(..., K)`` (:func:`splitq_jax.quant.quantize`)."""
    return quantized_acts(quant.quantize(x, bits, symmetric=symmetric, clip=clip), bits, symmetric)


@dataclasses.dataclass(frozen=True)
class GemmWeight:
    """A packed weight ``(N, K)`` ready for the split GEMM.

    Leaves:
      qvalue: ``(N, ceil(K / c))`` uint8 or uint32 words, signed ``bits``-wide values, the layout
        of :mod:`splitq_jax.packing`.
      scale: ``(N,)`` float32 per output channel.
      row_sum: ``(N,)`` int32, ``sum_k q[n, k]``.
    Static: ``bits`` (2, 3, 4 or 8: 5- to 7-bit weights are stored as 8-bit), ``k`` (= K),
    ``word_dtype`` (``"uint8"`` or ``"uint32"``).
    """

    qvalue: jax.Array
    scale: jax.Array
    row_sum: jax.Array
    bits: int
    k: int
    word_dtype: str

    @property
    def n(self) -> int:
        return int(self.qvalue.shape[0])


jax.tree_util.register_dataclass(
    GemmWeight, data_fields=["qvalue", "scale", "row_sum"], meta_fields=["bits", "k", "word_dtype"]
)


def gemm_weight(t: packing.PackedTensor) -> GemmWeight:
    """Prepare a stored weight (as :func:`splitq_jax.fold.pack_weight` makes it) for the GEMM.

    Raises for what the split GEMM does not take: asymmetric weights (a weight zero point would
    need per-token sums of the activations), per-group scales (``group_size``; the epilogue
    applies one scale per output channel) and anything but a 2-D ``(N, K)`` weight.
    """
    if not isinstance(t, packing.PackedTensor):
        raise TypeError(f"gemm_weight() takes a PackedTensor, got {type(t).__name__}")
    if len(t.shape) != 2:
        raise ValueError(f"a GEMM weight is (d_out, d_in), got shape {t.shape}")
    if not t.symmetric or t.zero_point is not None:
        raise ValueError("split_gemm takes symmetric weights only (w_symmetric=True)")
    if t.group_size is not None:
        raise ValueError(
            f"split_gemm takes per-output-channel weight scales, not groups of {t.group_size}"
        )
    q = packing.unpack(t.qvalue, t.bits, t.shape[-1], t.word_dtype, signed=True)
    return GemmWeight(
        qvalue=t.qvalue,
        scale=jnp.asarray(t.scale, jnp.float32),
        row_sum=jnp.sum(q, axis=-1, dtype=jnp.int32),
        bits=t.bits,
        k=int(t.shape[-1]),
        word_dtype=t.word_dtype,
    )


def folded_weights(weights: dict[str, Any]) -> dict[str, GemmWeight]:
    """GEMM weights of one folded linear (``fold.fold_group(...)["weights"][name]``).

    ``{"main": ..., "cws": ..., "mac": ..., "text": ..., "vision": ...}`` (present ones only); a
    branch contributes its up-projection ``l_out`` ``(d_out, r)``; its down-projection ``l_in``
    runs before the GEMM, where the activations are quantized.
    """
    out = {"main": gemm_weight(weights["main"])}
    for name in TERMS:
        if name in weights:
            w = weights[name]
            out[name] = gemm_weight(w["l_out"] if isinstance(w, dict) else w)
    return out


def check_operands(
    x: QuantizedActs,
    w: GemmWeight,
    terms: dict[str, tuple[QuantizedActs, GemmWeight]],
    text_mask: jax.Array | None,
    bias: jax.Array | None,
) -> None:
    """Shape and dtype checks shared by every implementation."""
    rows = tuple(x.qvalue.shape[:-1])
    n = w.n
    for name, (a, b) in (("main", (x, w)), *terms.items()):
        if not isinstance(a, QuantizedActs) or not isinstance(b, GemmWeight):
            raise TypeError(f"{name}: expected (QuantizedActs, GemmWeight)")
        if a.qvalue.dtype != jnp.int8:
            raise ValueError(f"{name}: activations must be int8, got {a.qvalue.dtype}")
        if tuple(a.qvalue.shape[:-1]) != rows:
            raise ValueError(
                f"{name}: activations have rows {tuple(a.qvalue.shape[:-1])}, main has {rows}"
            )
        if a.qvalue.shape[-1] != b.k:
            raise ValueError(f"{name}: activations have K={a.qvalue.shape[-1]}, weight K={b.k}")
        if tuple(a.scale.shape) != rows or (
            a.zero_point is not None and tuple(a.zero_point.shape) != rows
        ):
            raise ValueError(f"{name}: activation scale / zero point must have shape {rows}")
        if b.n != n:
            raise ValueError(f"{name}: weight has {b.n} output channels, main has {n}")
        if b.bits not in packing.SUPPORTED_BITS:
            raise ValueError(f"{name}: unsupported weight bits {b.bits}")
        if b.qvalue.shape != (n, packing.packed_length(b.k, b.bits, b.word_dtype)):
            raise ValueError(f"{name}: packed words of shape {b.qvalue.shape} do not hold K={b.k}")
    if "mac" in terms and text_mask is None:
        raise ValueError("the MAC term applies to text tokens only: pass text_mask")
    if text_mask is not None and tuple(text_mask.shape) != rows:
        raise ValueError(f"text_mask must have shape {rows}, got {tuple(text_mask.shape)}")
    if bias is not None and tuple(np.shape(bias)) != (n,):
        raise ValueError(f"bias must have shape {(n,)}, got {tuple(np.shape(bias))}")
