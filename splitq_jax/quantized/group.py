"""The fake-quant forward of one folded linear group: the inference math every method's stored
block runs (and that the transform engine trains through, so folded == calibrated by construction).

For a group input ``x: (..., N, d)`` and each linear ``name`` of the group::

    y = Q(x_m P) W_main^T  +  Q(Q(x_m P) L_in^T) L_out^T  [cws]  +  text tokens: same with [mac]
        + Q(x_t P_t) W_text^T  +  Q(x_v P_v) W_vision^T  +  b

where ``x_m`` is the main channels (masked or gathered), ``P`` the online main transform (None:
identity), ``Q`` the activation quantizer; absent parts are skipped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from splitq_jax import transforms as tf
from splitq_jax.quant import aux_bits, fake_quant

Tree = dict[str, Any]


class Bits(NamedTuple):
    """Resolved bit widths of one forward pass; ``None`` entries are off."""

    w: int | None
    a: int | None
    aux_w: int | None
    aux_a: int | None

    @classmethod
    def of(cls, cfg: Any, quantize: bool = True) -> "Bits":
        """From anything with ``w_bits`` / ``a_bits`` (an :class:`InferenceSpec`, a method config)."""
        if not quantize:
            return cls(None, None, None, None)
        return cls(cfg.w_bits, cfg.a_bits, aux_bits(cfg.w_bits), aux_bits(cfg.a_bits))


class WeightSpec(NamedTuple):
    """A weight about to be quantized: rows are output channels (per-row scales)."""

    w: jax.Array  # (rows, cols)
    bits: int | None
    clip: Tree | None
    group_size: int | None = None


def is_spec(x: Any) -> bool:
    return isinstance(x, WeightSpec)


def main_input(x: jax.Array, split: Tree, main_path: str) -> jax.Array:
    """The main path's input ``(..., N, km)`` from the group input ``x (..., N, d)``: ``x`` itself
    when the main part is every channel (``main_mask`` None, the canonical form), else the masked
    ``x * main_mask`` or the gathered ``x[..., main_idx]``."""
    if split["main_mask"] is None:
        return x
    if main_path == "gathered":
        return jnp.take(x, split["main_idx"], axis=-1)
    return x * split["main_mask"].astype(x.dtype)


def main_act(acts: Tree, split: Tree, x: jax.Array, cfg: Any, bits: Bits) -> jax.Array:
    """``Q(x_m P)`` ``(..., N, km)``: what the main weights of a group multiply (the input of a
    weight solver's Hessian)."""
    xm = main_input(x, split, cfg.main_path)
    return fake_quant(tf.apply_act(acts["transform"], xm), bits.a, symmetric=cfg.a_symmetric, clip=acts["act_clip"])


def apply_group(
    acts: Tree,
    split: Tree,
    weights: dict[str, Tree],
    biases: dict[str, jax.Array | None],
    x: jax.Array,
    text_mask: jax.Array | None,
    cfg: Any,
    bits: Bits,
) -> dict[str, jax.Array]:
    """The activation path of Eq. 13-19 over already (fake-)quantized weights.

    Args:
      acts, split, biases: a folded group's entries (:mod:`splitq_jax.quantized.schema`);
      weights: its weights as plain (dequantized or fake-quantized) arrays; x: ``(..., N, d)``;
      text_mask: ``(..., N)`` bool or None; cfg: anything with ``main_path`` and ``a_symmetric``
        (an :class:`~splitq_jax.quantized.schema.InferenceSpec`).
    Returns:
      ``{name: (..., N, d_out)}``.
    """
    dtype = x.dtype
    xq = main_act(acts, split, x, cfg, bits)
    outlier_x = {}
    for group in ("text", "vision"):
        if acts.get(group) is not None:
            xg = tf.apply_act(acts[group]["transform"], jnp.take(x, split[f"{group}_idx"], axis=-1))
            outlier_x[group] = fake_quant(xg, bits.aux_a, symmetric=cfg.a_symmetric, clip=acts[group]["act_clip"])

    def lowrank(f: Tree) -> jax.Array:
        h = fake_quant(xq @ f["l_in"].T.astype(dtype), bits.aux_a, symmetric=cfg.a_symmetric)
        return h @ f["l_out"].T.astype(dtype)

    out = {}
    for name, w in weights.items():
        y = xq @ w["main"].T.astype(dtype)
        if "cws" in w:
            y = y + lowrank(w["cws"])
        # MAC predicts the output error of *activation* quantization (Eq. 18); with activations
        # unquantized that error is zero, so the branch is off and the exact identity holds.
        if "mac" in w and text_mask is not None and bits.a is not None:
            y = y + jnp.where(text_mask[..., None], lowrank(w["mac"]), 0.0).astype(dtype)
        for group, xg in outlier_x.items():
            y = y + xg @ w[group].T.astype(dtype)
        if biases.get(name) is not None:
            y = y + biases[name].astype(dtype)
        out[name] = y
    return out
