"""Plain XLA reference of the activation stage of one split linear group (spec Eq. 6, 13-21).

Op for op what :func:`splitq_jax.quantized.qlinear.quantized_group_apply` computed before its GEMMs (until
this op replaced that code), so the runtime's results are unchanged:

* main path: ``x * main_mask`` (masked) or ``x[..., main_idx]`` (gathered), the online transform
  (:func:`splitq_jax.transforms.apply_act`: ``diag(c)`` if still unfolded, then ``P1 kron P2``),
  per-token quantization at ``main_bits`` with the learned clip
  (:func:`splitq_jax.pallas.split_gemm.quantize_acts`);
* each outlier group: ``x[..., idx]``, its small dense transform, per-token quantization at
  ``aux_bits`` with the group's clip;
* each low-rank branch (CWS / MAC of any linear of the group): ``h = x_hat L_in^T`` as the split
  GEMM computes it from the quantized main activations (int8 x packed int -> int32 dot,
  ``(float32(acc) * s_x) * s_w``), cast to the activation dtype, re-quantized per token at
  ``aux_bits`` (no clip).

With ``packed=True`` every operand is stored in the packed format of
:func:`splitq_jax.pallas.split_gemm.act_lane_bits` (two signed 4-bit lanes per uint8 at 2..4 bits,
int8 above): the same integers, packed with :func:`splitq_jax.packing.pack`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from splitq_jax import transforms as tf
from splitq_jax.pallas.split_gemm.operands import GemmWeight, QuantizedActs, quantize_acts
from splitq_jax.pallas.split_gemm.reference import split_gemm_xla

Tree = dict[str, Any]


class OutlierGroup(NamedTuple):
    """One outlier group: channel indices ``(k,)`` int, its dense transform (``{"p": (k, k)}`` or
    None) and its activation clipping logits (``{"max", "min"}`` or None)."""

    idx: jax.Array
    transform: Tree | None
    clip: Tree | None


class ActPacked(NamedTuple):
    """Operands of :func:`splitq_jax.pallas.split_gemm.split_gemm` for every linear of a group.

    main: the main-path activations ``(..., K_main)``; outliers: ``{group: (..., k_g)}``;
    branches: ``{name: (..., r)}`` (one per given down-projection, same keys).
    """

    main: QuantizedActs
    outliers: dict[str, QuantizedActs]
    branches: dict[str, QuantizedActs]


def main_input(x: jax.Array, main_path: str, main_mask, main_idx) -> jax.Array:
    """The main path's input channels, as :func:`splitq_jax.quantized.group.apply_group` takes them."""
    if main_path == "gathered":
        if main_idx is None:
            raise ValueError("the gathered main path needs main_idx")
        return jnp.take(x, main_idx, axis=-1)
    if main_path != "masked":
        raise ValueError(f"main_path must be 'masked' or 'gathered', got {main_path!r}")
    if main_mask is None:
        return x
    return x * main_mask.astype(x.dtype)


@functools.partial(
    jax.jit, static_argnames=("main_bits", "aux_bits", "symmetric", "main_path", "packed")
)
def act_pack_xla(
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
) -> ActPacked:
    """The activation stage in plain XLA (see the module docstring); arguments as
    :func:`splitq_jax.pallas.act_pack.act_pack`."""
    xt = tf.apply_act(transform, main_input(x, main_path, main_mask, main_idx))
    main = quantize_acts(xt, main_bits, symmetric=symmetric, clip=act_clip, packed=packed)
    groups = {}
    for name, g in (outliers or {}).items():
        xg = tf.apply_act(g.transform, jnp.take(x, g.idx, axis=-1))
        groups[name] = quantize_acts(xg, aux_bits, symmetric=symmetric, clip=g.clip, packed=packed)
    hs = {}
    for name, l_in in (branches or {}).items():
        h = split_gemm_xla(main, l_in).astype(x.dtype)
        hs[name] = quantize_acts(h, aux_bits, symmetric=symmetric, packed=packed)
    return ActPacked(main, groups, hs)
