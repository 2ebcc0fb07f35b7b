"""The stored format's method-agnostic steps: packing weights, the canonical fold, and the
fake-quant forward of a folded block.

* :func:`pack_weight`: quantize a weight once and pack its integers (:mod:`splitq_jax.packing`).
* :func:`canonicalize`: what every method's folded block goes through (the pipeline calls it):
  a main transform's diagonal ``c`` moves into the norm that feeds its group (``attn_in``,
  ``mlp_in``), and transforms left with identity factors only are dropped, so e.g. a SmoothQuant
  block runs transform-free. Kronecker factors, outlier transforms and the ``c`` of groups no
  norm feeds stay online.
* :func:`folded_block_forward`: dequantize the packed weights, quantize activations on the fly
  (:func:`splitq_jax.quantized.group.apply_group`), reading only an inference spec.

A method's own fold (what its calibrated state becomes) lives with the method, e.g.
:func:`splitq_jax.methods.transform.fold_block`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import modality as md
from splitq_jax.packing import PackedTensor, pack_quantized, unpack_dequantize
from splitq_jax.quant import quantize
from splitq_jax.quantized.group import Bits, WeightSpec, apply_group

Tree = dict[str, Any]


def storage_bits(bits: int) -> tuple[int, Any]:
    """Container width and word type for a ``bits``-wide integer: 3-bit packs 10 per uint32,
    5- to 7-bit values sit in bytes."""
    if bits == 3:
        return 3, jnp.uint32
    return (bits if bits in (2, 4, 8) else 8), jnp.uint8


def pack_weight(spec: WeightSpec, symmetric: bool) -> PackedTensor | jax.Array:
    """Quantize and pack one weight (``symmetric``: zero-point free); a weight whose quantizer is
    off stays float32."""
    if spec.bits is None:
        return jnp.asarray(spec.w, jnp.float32)
    p = quantize(spec.w, spec.bits, symmetric=symmetric, clip=spec.clip, group_size=spec.group_size)
    container, word = storage_bits(spec.bits)
    return pack_quantized(p, container, symmetric, spec.w.shape, spec.group_size, word_dtype=word)


def is_stored(x: Any) -> bool:
    return isinstance(x, PackedTensor)


def materialize(weights: Tree) -> Tree:
    """Dequantize every packed weight (float arrays pass through)."""
    return jax.tree_util.tree_map(
        lambda t: unpack_dequantize(t) if is_stored(t) else t, weights, is_leaf=is_stored
    )


def folded_group_forward(folded: Tree, x: jax.Array, text_mask: jax.Array | None, cfg: Any,
                         *, quantize_acts: bool = True) -> dict[str, jax.Array]:
    """Fake-quant forward of a folded group from its stored (packed) weights; ``cfg``: an
    :class:`~splitq_jax.quantized.schema.InferenceSpec` (or a config with its fields)."""
    bits = Bits.of(cfg, quantize_acts)
    return apply_group(folded["acts"], folded["split"], materialize(folded["weights"]), folded["biases"],
                          x, text_mask, cfg, bits)


def _fold_diag_into_norm(norm: Tree, folded: Tree, main_path: str) -> Tree:
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
    if split["main_mask"] is None:  # the main part is every channel
        c_full = t["c"]
    elif main_path == "gathered":
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


def is_full_main(split: Tree) -> bool:
    """Whether, concretely, a group's main part is every input channel in order: an all-ones
    ``main_mask``, ``main_idx = arange(d)`` and no outlier channel (a traced split never is)."""
    mask, idx = split["main_mask"], split["main_idx"]
    if mask is None or idx is None or any(isinstance(a, jax.core.Tracer) for a in (mask, idx)):
        return False
    mask, idx = np.asarray(mask), np.asarray(idx)
    return (mask.ndim == 1 and bool(np.all(mask == 1)) and np.array_equal(idx, np.arange(mask.shape[0]))
            and all(np.size(split[f"{g}_idx"]) == 0 for g in ("text", "vision")))


def canonicalize(block: Tree, group_norm: dict[str, str], main_path: str) -> Tree:
    """The one canonical form of a folded block, whatever method made it (a new tree; ``block``
    is left as it is): each main transform's diagonal ``c`` moves into the norm that feeds its
    group (``group_norm``: group -> norm; e.g. ``BlockConfig.group_norm``), then main transforms
    of identity factors only are dropped, so such groups run transform-free, and a main part that
    is every channel drops its all-ones mask and ``arange`` index (``main_mask = main_idx = None``:
    the runtime feeds the input as it is, no multiply, no gather). Idempotent; exact
    (``x (I kron I) = x * 1 = x``; the norm's output times ``c`` is the same product in another place)."""
    groups = {g: {**f, "acts": dict(f["acts"]), "split": dict(f["split"])} for g, f in block["groups"].items()}
    norms = {k: dict(v) for k, v in block["norms"].items()}
    for g, norm in group_norm.items():
        if g in groups and norm in norms:
            norms[norm] = _fold_diag_into_norm(norms[norm], groups[g], main_path)
    for f in groups.values():
        f["acts"]["transform"] = drop_identity(f["acts"]["transform"])
        if is_full_main(f["split"]):
            f["split"].update(main_mask=None, main_idx=None)
    return {"norms": norms, "groups": groups}


def folded_block_forward(folded: Tree, x, cos, sin, mask, modality, cfg: Any, bcfg: Any,
                         *, quantize_acts: bool = True) -> jax.Array:
    """The folded block in fake-quant; same signature as the calibrated block's forward."""
    tmask = md.text_mask(modality, cfg.text_tokens)
    weights = {g: materialize(f["weights"]) for g, f in folded["groups"].items()}
    bits = Bits.of(cfg, quantize_acts)

    def linear(group: str, inp: jax.Array) -> dict[str, jax.Array]:
        f = folded["groups"][group]
        return apply_group(f["acts"], f["split"], weights[group], f["biases"], inp, tmask, cfg, bits)

    return bcfg.forward(folded["norms"], linear, x, cos, sin, mask)
