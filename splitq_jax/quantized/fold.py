"""Folding a calibrated block into what inference stores (spec: "After calibration ...").

* The main transform's diagonal ``c`` is folded into the preceding RMSNorm where there is one
  (``attn_in``, ``mlp_in``); the Kronecker factors stay online (applied to activations at run time,
  FlatQuant's design), as do the small outlier transforms and ``c`` of ``attn_out`` / ``mlp_out``.
* Every stored weight is quantized once and packed: the residual ``R`` of the main path at ``b`` bits,
  the outlier weights and all branch factors at ``max(b, 4)`` bits.

The folded block run in fake-quant (dequantize the packed weights, quantize activations on the fly)
reproduces the calibrated block, because both go through :func:`splitq_jax.split_linear.apply_group`
with weights produced by the same :func:`~splitq_jax.split_linear.prequant_weights`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import split_linear as sl
from splitq_jax.block import GROUP_NORM, BlockConfig
from splitq_jax import modality as md
from splitq_jax.config import MethodConfig, as_engine
from splitq_jax.packing import PackedTensor, pack_quantized, unpack_dequantize
from splitq_jax.quant import quantize

Tree = dict[str, Any]


def storage_bits(bits: int) -> tuple[int, Any]:
    """Container width and word type for a ``bits``-wide integer: 3-bit packs 10 per uint32,
    5- to 7-bit values sit in bytes."""
    if bits == 3:
        return 3, jnp.uint32
    return (bits if bits in (2, 4, 8) else 8), jnp.uint8


def pack_weight(spec: sl.WeightSpec, cfg: MethodConfig) -> PackedTensor | jax.Array:
    """Quantize and pack one weight; a weight whose quantizer is off stays float32."""
    if spec.bits is None:
        return jnp.asarray(spec.w, jnp.float32)
    p = quantize(spec.w, spec.bits, symmetric=cfg.w_symmetric, clip=spec.clip, group_size=spec.group_size)
    container, word = storage_bits(spec.bits)
    return pack_quantized(p, container, cfg.w_symmetric, spec.w.shape, spec.group_size, word_dtype=word)


def is_stored(x: Any) -> bool:
    return isinstance(x, PackedTensor)


def materialize(weights: Tree) -> Tree:
    """Dequantize every packed weight (float arrays pass through)."""
    return jax.tree_util.tree_map(
        lambda t: unpack_dequantize(t) if is_stored(t) else t, weights, is_leaf=is_stored
    )


def fold_group(params: Tree, consts: Tree, cfg: MethodConfig) -> Tree:
    """``{"acts", "split", "weights", "biases"}``: everything inference needs for one group."""
    specs = sl.prequant_weights(params, consts, cfg, sl.Bits.of(cfg))
    weights = jax.tree_util.tree_map(lambda s: pack_weight(s, cfg), specs, is_leaf=sl.is_spec)
    return {"acts": sl.act_params(params), "split": consts["split"], "weights": weights,
            "biases": sl.biases_of(consts)}


def folded_group_forward(folded: Tree, x: jax.Array, text_mask: jax.Array | None, cfg: MethodConfig,
                         *, quantize_acts: bool = True) -> dict[str, jax.Array]:
    """Fake-quant forward of a folded group from its stored (packed) weights."""
    bits = sl.Bits.of(cfg, quantize_acts)
    return sl.apply_group(folded["acts"], folded["split"], materialize(folded["weights"]), folded["biases"],
                          x, text_mask, cfg, bits)


def _fold_diag_into_norm(norm: Tree, folded: Tree, cfg: MethodConfig) -> Tree:
    """Move ``c`` of the group's main transform into the norm that produces its input: its scale,
    and its bias too for a LayerNorm (``(n(x) g + b) c = n(x) (g c) + b c``).

    Outlier channels keep ``c = 1`` there so the outlier paths see the same input as before; in
    the masked main path their ``c`` only ever multiplied zeros.
    """
    t = folded["acts"]["transform"]
    if t is None or "c" not in t:
        return norm
    split = folded["split"]
    d = norm["scale"].shape[0]
    if cfg.main_path == "gathered":
        c_full = jnp.ones((d,), jnp.float32).at[split["main_idx"]].set(t["c"])
    else:
        c_full = t["c"] * split["main_mask"] + (1.0 - split["main_mask"])
    folded["acts"]["transform"] = {k: v for k, v in t.items() if k != "c"}
    return {k: v * c_full for k, v in norm.items()}


def is_identity(a: Any) -> bool:
    """Whether ``a`` is, concretely, an identity matrix (a traced value never is: under ``jit``
    nothing is known about it, so it is kept)."""
    if isinstance(a, jax.core.Tracer) or getattr(a, "ndim", 0) != 2 or a.shape[0] != a.shape[1]:
        return False
    return bool(np.array_equal(np.asarray(a), np.eye(a.shape[0], dtype=np.asarray(a).dtype)))


def drop_identity(transform: Tree | None) -> Tree | None:
    """The canonical main transform: None when only identity Kronecker factors are left (after
    the diagonal moved into the norm), so the runtime takes the transform-free path. Exact:
    ``x (I kron I) = x``."""
    if transform is None or set(transform) - {"p1", "p2"}:
        return transform
    return None if all(is_identity(transform[k]) for k in transform) else transform


def fold_block(qparams: Tree, qconsts: Tree, cfg: MethodConfig, *, fold_norms: bool = True,
               bcfg=None) -> Tree:
    """Fold a calibrated block: ``{"norms": {...}, "groups": {group: folded group}}``.

    ``bcfg`` names the norm before each group (default: the decoder block's). Every method goes
    through this one fold: diagonals into norms, then identity transforms dropped."""
    cfg = as_engine(cfg)
    groups = {g: fold_group(qparams[g], qconsts[g], cfg) for g in qparams}
    norms = {k: dict(v) for k, v in qconsts["norms"].items()}
    if fold_norms:
        for g, norm in (GROUP_NORM if bcfg is None else bcfg.group_norm).items():
            norms[norm] = _fold_diag_into_norm(norms[norm], groups[g], cfg)
    for f in groups.values():
        f["acts"]["transform"] = drop_identity(f["acts"]["transform"])
    return {"norms": norms, "groups": groups}


def folded_block_forward(folded: Tree, x, cos, sin, mask, modality, cfg: MethodConfig, bcfg: BlockConfig,
                         *, quantize_acts: bool = True) -> jax.Array:
    """The folded block in fake-quant; same signature as the calibrated block's forward."""
    tmask = md.text_mask(modality, cfg.text_tokens)
    weights = {g: materialize(f["weights"]) for g, f in folded["groups"].items()}
    bits = sl.Bits.of(cfg, quantize_acts)

    def linear(group: str, inp: jax.Array) -> dict[str, jax.Array]:
        f = folded["groups"][group]
        return sl.apply_group(f["acts"], f["split"], weights[group], f["biases"], inp, tmask, cfg, bits)

    return bcfg.forward(folded["norms"], linear, x, cos, sin, mask)
