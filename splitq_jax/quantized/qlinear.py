"""The real low-bit linear: integer matmuls over packed weights (the XLA reference path).

:func:`quantized_group_apply` computes what :func:`splitq_jax.quantized.fold.folded_group_forward` computes in
fake-quant, but every weight matmul runs on integers::

    x ~= s_x (q_x - z_x)    per token   (activations, quantized on the fly)
    W ~= s_w (q_w - z_w)    per row     (stored packed; unpacked to int8)
    x W^T = s_x s_w [ Σ q_x q_w  -  z_x Σ q_w  -  z_w Σ q_x  +  K z_x z_w ]
            ^^^^^^^   ^^^^^^^^^    int8 x int8 -> int32 dot; Σ q_w is a per-row constant of the
            epilogue  weight (a kernel precomputes it at load time), Σ q_x one sum per token.

Zero points are 0 for symmetric quantizers and the correction terms vanish. Unsigned (asymmetric)
integers are re-centred by ``2^(bits-1)`` -- both ``q`` and ``z`` -- so that 8-bit values fit int8;
``q - z`` is unchanged. The bracket is exact in int32 while ``|Σ (q_x - z_x)(q_w - z_w)| < 2^31``,
i.e. for ``K < 33000`` input channels at 8 bits (int32 wrap-around of the partial terms cancels).

Weight groups (``group_size``) stay integer too: one int32 dot per group
(``(..., G, g) x (O, G, g) -> (..., O, G)``) with per-group corrections, then
``s_x Σ_g s_w[o, g] acc[..., o, g]``.

Paths that cannot be integer fall back to float, exactly as the fake-quant reference does:
activations off (weight-only ``w4a16``) multiply the dequantized weight; a weight whose quantizer is
off (a float leaf) multiplies the dequantized activations.

Everything else is :func:`splitq_jax.quantized.group.apply_group`'s activation path: the main
transform, per-token activation quantization with its clipping, outlier groups at aux bits, the
CWS branch for every token and MAC for text tokens (only when activations are quantized), whose
rank-``r`` intermediate is re-quantized per token at aux bits, then bias. Results equal the
fake-quant path up to float32 reassociation (a value within round-off of a rounding boundary can
land on the neighbouring integer; the tests use fixed data).

:func:`int_linear` (unpack, int8 dot, epilogue) is the unit a Pallas kernel replaces.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from splitq_jax import transforms as tf
from splitq_jax.packing import PackedTensor, unpack, unpack_dequantize
from splitq_jax.quant import quantize, saturate
from splitq_jax.quantized.group import Bits, main_input
from splitq_jax.quantized.schema import InferenceSpec

Tree = dict[str, Any]


class QActs(NamedTuple):
    """Per-token quantized activations: ``x ~= scale[..., None] * (qvalue - zero_point[..., None])``.

    qvalue: ``(..., K)`` int8 (re-centred by ``2^(bits-1)`` when asymmetric); scale: ``(...,)``
    float32; zero_point: ``(...,)`` int32 with the same re-centring, or None (symmetric).
    """

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None


class IntWeight(NamedTuple):
    """An unpacked weight: ``W ~= scale * (qvalue - zero_point)`` row-wise (or per group).

    qvalue: int8 ``(O, K)``, or ``(O, G, g)`` with groups; scale: float32 ``(O,)`` / ``(O, G)``;
    zero_point: int32 of ``scale``'s shape (re-centred like :class:`QActs`), or None (symmetric).
    """

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None


def _centre(bits: int) -> int:
    return 1 << (bits - 1)


def quantize_acts(x: jax.Array, bits: int, *, symmetric: bool, clip: Tree | None = None) -> QActs:
    """Quantize ``x: (..., K)`` per token with :func:`splitq_jax.quant.quantize` (same rounding and
    clipping as the fake-quant path)."""
    p = quantize(x, bits, symmetric=symmetric, clip=clip)
    scale = p.scale[..., 0].astype(jnp.float32)
    if symmetric:
        return QActs(p.qvalue.astype(jnp.int8), scale, None)
    c = _centre(bits)
    return QActs((p.qvalue - c).astype(jnp.int8), scale, p.zero_point[..., 0] - c)


def dequantize_acts(a: QActs) -> jax.Array:
    """``scale * (q - z)`` in float32 (saturated, as ``fake_quant``), bit-identical to
    ``fake_quant``'s float32 output."""
    q = a.qvalue.astype(jnp.int32)
    if a.zero_point is not None:
        q = q - a.zero_point[..., None]
    return saturate(q.astype(jnp.float32) * a.scale[..., None], jnp.float32)


def unpack_weight(t: PackedTensor) -> IntWeight:
    """Unpack a stored weight to int8 values (grouped as ``(O, G, g)`` when it has groups)."""
    if len(t.shape) != 2:
        raise ValueError(f"a linear weight must be 2-D (d_out, d_in), got shape {t.shape}")
    q = unpack(t.qvalue, t.bits, t.shape[-1], t.word_dtype, signed=t.symmetric)
    zero = None
    if not t.symmetric:
        c = _centre(t.bits)
        q = q - c
        zero = t.zero_point.astype(jnp.int32) - c
    if t.group_size is not None:
        q = q.reshape(t.shape[0], t.shape[1] // t.group_size, t.group_size)
    return IntWeight(q.astype(jnp.int8), t.scale.astype(jnp.float32), zero)


def int_linear(a: QActs, t: PackedTensor) -> jax.Array:
    """``x W^T`` for quantized activations ``(..., K)`` and a packed weight ``(O, K)``: an int8 x int8
    -> int32 dot, zero-point corrections in int32, one float32 epilogue. Returns ``(..., O)`` float32."""
    w = unpack_weight(t)
    k = a.qvalue.shape[-1]
    if k != t.shape[1]:
        raise ValueError(f"activation width {k} does not match weight shape {t.shape}")
    if t.group_size is None:
        acc = jnp.einsum("...k,ok->...o", a.qvalue, w.qvalue, preferred_element_type=jnp.int32)
        if a.zero_point is not None:
            w_sum = jnp.sum(w.qvalue, axis=-1, dtype=jnp.int32)  # (O,)
            acc = acc - a.zero_point[..., None] * w_sum
        if w.zero_point is not None:
            x_sum = jnp.sum(a.qvalue, axis=-1, dtype=jnp.int32)  # (...,)
            acc = acc - x_sum[..., None] * w.zero_point
            if a.zero_point is not None:
                acc = acc + k * a.zero_point[..., None] * w.zero_point
        return a.scale[..., None] * w.scale * acc.astype(jnp.float32)
    g = t.group_size
    xg = a.qvalue.reshape(*a.qvalue.shape[:-1], k // g, g)
    acc = jnp.einsum("...gk,ogk->...og", xg, w.qvalue, preferred_element_type=jnp.int32)  # (..., O, G)
    if a.zero_point is not None:
        w_sum = jnp.sum(w.qvalue, axis=-1, dtype=jnp.int32)  # (O, G)
        acc = acc - a.zero_point[..., None, None] * w_sum
    if w.zero_point is not None:
        x_sum = jnp.sum(xg, axis=-1, dtype=jnp.int32)  # (..., G)
        acc = acc - x_sum[..., None, :] * w.zero_point
        if a.zero_point is not None:
            acc = acc + g * a.zero_point[..., None, None] * w.zero_point
    return a.scale[..., None] * jnp.sum(w.scale * acc.astype(jnp.float32), axis=-1)


def linear(x: QActs | jax.Array, w: PackedTensor | jax.Array) -> jax.Array:
    """``x W^T`` in float32: integer when both sides are quantized, else the float fallback."""
    if isinstance(x, QActs) and isinstance(w, PackedTensor):
        return int_linear(x, w)
    xf = dequantize_acts(x) if isinstance(x, QActs) else x
    wf = unpack_dequantize(w) if isinstance(w, PackedTensor) else w
    return (xf @ wf.T.astype(xf.dtype)).astype(jnp.float32)


def _maybe_quantize(x: jax.Array, bits: int | None, symmetric: bool, clip: Tree | None = None):
    return x if bits is None else quantize_acts(x, bits, symmetric=symmetric, clip=clip)


def _kernel_ready(w: Tree) -> bool:
    """Whether every stored weight of a folded linear is one the split GEMM takes (symmetric,
    per-output-channel scales); asymmetric or grouped weights use the integer path below."""
    leaves = jax.tree_util.tree_leaves(w, is_leaf=lambda t: isinstance(t, PackedTensor))
    return all(isinstance(t, PackedTensor) and t.symmetric and t.group_size is None for t in leaves)


def _act_pack_group(folded: Tree, x: jax.Array, names: list[str], text_mask, cfg: InferenceSpec, bits: Bits,
                    implementation: str | None):
    """Every activation operand of the group's split GEMMs in one :func:`splitq_jax.pallas.act_pack.act_pack`
    call: main path, outlier groups and the down-projected branch intermediates of the linears ``names``
    (CWS for every token; MAC only when text tokens are given, as :func:`splitq_jax.quantized.group.apply_group`).

    The operands come packed (``packed=True``: two 4-bit lanes per byte for activations of at most 4 bits, int8
    above; :class:`splitq_jax.pallas.split_gemm.QuantizedActs`), which halves the activation bytes between the two
    kernels at A4 / A3 / A2; the split GEMM unpacks them to the same integers."""
    from splitq_jax.pallas.act_pack import OutlierGroup, act_pack
    from splitq_jax.pallas.split_gemm import gemm_weight

    acts, split = folded["acts"], folded["split"]
    outliers = {g: OutlierGroup(split[f"{g}_idx"], acts[g]["transform"], acts[g]["act_clip"])
                for g in ("text", "vision") if acts.get(g) is not None}
    branches = {}
    for name in names:
        w = folded["weights"][name]
        for branch in ("cws", "mac"):
            if branch in w and (branch == "cws" or text_mask is not None):
                branches[f"{name}/{branch}"] = gemm_weight(w[branch]["l_in"])
    # a main part of every channel (no mask, no index) is the masked path's no-mask case
    main_path = cfg.main_path if split["main_mask"] is not None else "masked"
    return act_pack(x, main_bits=bits.a, aux_bits=bits.aux_a, symmetric=cfg.a_symmetric, main_path=main_path,
                    main_mask=split["main_mask"], main_idx=split["main_idx"], transform=acts["transform"],
                    act_clip=acts["act_clip"], outliers=outliers, branches=branches, packed=True,
                    implementation=implementation)


def _split_gemm_linear(packed, name: str, w: Tree, bias, text_mask, implementation: str | None) -> jax.Array:
    """One folded linear through :func:`splitq_jax.pallas.split_gemm.split_gemm`: main product, outlier
    groups, CWS and MAC up-projections and bias in one call, on the operands of :func:`_act_pack_group`."""
    from splitq_jax.pallas.split_gemm import gemm_weight, split_gemm

    terms: dict[str, Any] = {}
    for branch in ("cws", "mac"):
        if f"{name}/{branch}" in packed.branches:
            terms[branch] = (packed.branches[f"{name}/{branch}"], gemm_weight(w[branch]["l_out"]))
    for group, xg in packed.outliers.items():
        terms[group] = (xg, gemm_weight(w[group]))
    return split_gemm(packed.main, gemm_weight(w["main"]), **terms, text_mask=text_mask if "mac" in terms else None,
                      bias=bias, implementation=implementation)


def quantized_group_apply(folded: Tree, x: jax.Array, text_mask: jax.Array | None,
                          cfg: InferenceSpec, *, implementation: str | None = None) -> dict[str, jax.Array]:
    """A folded group (:mod:`splitq_jax.quantized.schema`) with integer matmuls.

    Linears whose weights are all symmetric per-channel (the default) run through the Pallas ops
    (``implementation``: None = Pallas on GPU, their XLA references elsewhere): one
    :func:`splitq_jax.pallas.act_pack.act_pack` call for the whole group (transform, quantization,
    outlier groups, every branch down-projection; activations packed to 4-bit lanes up to 4 bits), then one
    packed split GEMM per linear. Others use
    the integer XLA path of this module.

    Args:
      folded: ``{"acts", "split", "weights", "biases"}`` with packed weights.
      x: ``(..., N, d)`` group input; text_mask: ``(..., N)`` bool (MAC tokens) or None.
    Returns:
      ``{name: (..., N, d_out)}`` in ``x.dtype``.
    """
    bits = Bits.of(cfg)
    acts, split = folded["acts"], folded["split"]
    dtype = x.dtype
    kernel_names = [n for n, w in folded["weights"].items() if bits.a is not None and _kernel_ready(w)]
    out = {}
    if kernel_names:
        packed = _act_pack_group(folded, x, kernel_names, text_mask, cfg, bits, implementation)
        for name in kernel_names:
            y = _split_gemm_linear(packed, name, folded["weights"][name], folded["biases"].get(name), text_mask,
                                   implementation)
            out[name] = y.astype(dtype)
    if len(kernel_names) == len(folded["weights"]):
        return out

    xm = main_input(x, split, cfg.main_path)
    xq = _maybe_quantize(tf.apply_act(acts["transform"], xm), bits.a, cfg.a_symmetric, acts["act_clip"])
    outlier_x = {}
    for group in ("text", "vision"):
        if acts.get(group) is not None:
            xg = tf.apply_act(acts[group]["transform"], jnp.take(x, split[f"{group}_idx"], axis=-1))
            outlier_x[group] = _maybe_quantize(xg, bits.aux_a, cfg.a_symmetric, acts[group]["act_clip"])

    def lowrank(f: Tree) -> jax.Array:
        h = linear(xq, f["l_in"]).astype(dtype)
        return linear(_maybe_quantize(h, bits.aux_a, cfg.a_symmetric), f["l_out"])

    for name, w in folded["weights"].items():
        if name in out:
            continue
        b = folded["biases"].get(name)
        y = linear(xq, w["main"])
        if "cws" in w:
            y = y + lowrank(w["cws"])
        # MAC corrects activation-quantization error: off with float activations (as in apply_group).
        # Computed for every token and masked; a kernel would gather the text rows instead.
        if "mac" in w and text_mask is not None and bits.a is not None:
            y = y + jnp.where(text_mask[..., None], lowrank(w["mac"]), 0.0)
        for group, xg in outlier_x.items():
            y = y + linear(xg, w[group])
        if b is not None:
            y = y + b.astype(jnp.float32)
        out[name] = y.astype(dtype)
    return {name: out[name] for name in folded["weights"]}


__all__ = ["IntWeight", "QActs", "dequantize_acts", "int_linear", "linear", "quantize_acts",
           "quantized_group_apply", "unpack_weight"]
