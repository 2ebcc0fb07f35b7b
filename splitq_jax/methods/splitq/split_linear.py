"""The split linear layer (spec Eq. 6, 13-21) for a *group* of linears sharing one input.

Layers that read the same activation (q/k/v; gate/up) share the channel split, the main transform
and the activation quantizer, so the activation is transformed and quantized once; each weight has
its own clipping, outlier weights and ACC branches.

For input ``X: (..., N, d)`` and each weight ``W: (d_out, d)``::

    Y = Y_main + Y_text + Y_vision + b
    Y_main   = Q(X_m P) Q(R)^T  +  Q(Q(X_m P) L1) Q(L2)  +  [text tokens] Q(Q(X_m P) L3) Q(L4)
    R        = P^-1 W_m^T - L1 L2                       (recomputed from the current P, g_c)
    L1 = P^-1 U_r diag(g_c), L2 = S_r V_r^T             (CWS, Eq. 16, 17, 21; g_c starts at 1)
    L3 = P^-1 U_r' diag(g_t), L4 = S_r' V_r'^T          (MAC, Eq. 18, 19, 21; g_t starts at 0)
    Y_text   = Q(X_t P_t) Q(P_t^-1 W_t^T)               (Eq. 13, at max(b, 4) bits)
    Y_vision = Q(X_v P_v) Q(P_v^-1 W_v^T)               (Eq. 14, at max(b, 4) bits)

With every quantizer off this equals ``X W^T + b`` exactly (Eq. 6 and the telescoping of R), which the
tests check to float32 round-off.

State is split in two pytrees: ``params`` (what training may change) and ``consts`` (weights, channel
indices, SVD bases). Weights are kept in the ``(d_out, d)`` orientation; ``P^-1 W^T`` appears as its
transpose ``W P^-T``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import transforms as tf
from splitq_jax.config import MethodConfig
from splitq_jax.quant import fake_quant, init_clip
from splitq_jax.quantized.group import Bits, WeightSpec, apply_group, is_spec  # noqa: F401  (the group's forward)

Tree = dict[str, Any]


def rank_of(ratio: float, d_in: int, d_out: int) -> int:
    """Branch rank ``ceil(ratio * min(d_in, d_out))`` (0 when the ratio is 0)."""
    return int(math.ceil(ratio * min(d_in, d_out))) if ratio > 0 else 0


_EXACT_SVD_MAX = 1024  # above this min(d, d_out), the top-r subspace comes from a randomized SVD


def _svd_top(w_rows: np.ndarray, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-``r`` SVD of ``W^T`` for ``W: (d_out, d)``: ``U_r: (d, r)`` and ``S_r V_r^T: (r, d_out)``.

    Small layers use an exact SVD. Large ones (spec Eq. 20 allows it) use a seeded randomized SVD
    (range finder with 16 extra columns and 4 power iterations, re-orthonormalised each time):
    seconds instead of minutes at 3B sizes. Only the subspace quality matters here, since
    ``R = P^-1 W_m^T - L1 L2`` absorbs whatever the branch does not represent.
    """
    a = np.asarray(w_rows, np.float32).T  # (d, d_out)
    if min(a.shape) <= _EXACT_SVD_MAX:
        u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
        return u[:, :r].astype(np.float32), (s[:r, None] * vt[:r]).astype(np.float32)
    k = min(r + 16, min(a.shape))
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(a @ rng.standard_normal((a.shape[1], k)).astype(np.float32))
    for _ in range(4):
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    ub, s, vt = np.linalg.svd((q.T @ a).astype(np.float64), full_matrices=False)
    u = q.astype(np.float64) @ ub
    return u[:, :r].astype(np.float32), (s[:r, None] * vt[:r]).astype(np.float32)


def init_group(
    key: jax.Array,
    weights: Mapping[str, Mapping[str, jax.Array]],
    cfg: MethodConfig,
    *,
    text_idx: np.ndarray | None = None,
    vision_idx: np.ndarray | None = None,
    act_absmax: jax.Array | None = None,
    transform: bool | None = None,
) -> tuple[Tree, Tree]:
    """Build ``(params, consts)`` for a group of linears sharing an input of width ``d``.

    Args:
      weights: ``{name: {"w": (d_out, d), "b": (d_out,) optional}}``.
      text_idx, vision_idx: outlier channel indices (Eq. 8, 11); None or empty = no such group.
      act_absmax: ``(d,)`` per-channel max |X| over calibration data, for the SmoothQuant-style
        initial diagonal (ignored with ``diag_init="ones"``).
      transform: whether this group gets the main transform (default ``cfg.transform``).
    """
    names = sorted(weights)
    d = int(weights[names[0]]["w"].shape[1])
    for n in names:
        if weights[n]["w"].ndim != 2 or weights[n]["w"].shape[1] != d:
            raise ValueError(
                f"weight {n!r} has shape {weights[n]['w'].shape}; every weight of a group must be "
                f"(d_out, {d}) because they share one input"
            )
    text_idx = np.asarray([] if text_idx is None else text_idx, np.int32)
    vision_idx = np.asarray([] if vision_idx is None else vision_idx, np.int32)
    outliers = np.concatenate([text_idx, vision_idx])
    if outliers.size and (outliers.min() < 0 or outliers.max() >= d):
        raise ValueError(f"outlier channel index out of range for input width {d}")
    if np.unique(outliers).size != outliers.size:
        raise ValueError("text and vision outlier channels must be disjoint and unique")
    main_mask = np.ones((d,), np.float32)
    main_mask[outliers] = 0.0
    main_idx = np.nonzero(main_mask)[0].astype(np.int32)
    if main_idx.size == 0:
        raise ValueError(f"the channel split leaves no main channels (d={d}); lower the ratios")
    gathered = cfg.main_path == "gathered"
    dm = int(main_idx.size) if gathered else d

    k_main, k_text, k_vis = jax.random.split(key, 3)
    params: Tree = {"weights": {}}
    consts: Tree = {
        "split": {
            "main_mask": jnp.asarray(main_mask),
            "main_idx": jnp.asarray(main_idx),
            "text_idx": jnp.asarray(text_idx),
            "vision_idx": jnp.asarray(vision_idx),
        },
        "weights": {},
    }

    def main_cols(w: np.ndarray) -> np.ndarray:
        return w[:, main_idx] if gathered else w * main_mask[None, :]

    # Main transform, with c initialised from activation and (all group) weight maxima.
    main_transform = None
    if cfg.transform if transform is None else transform:
        c = None
        if cfg.diag_init == "smooth" and act_absmax is not None:
            w_absmax = jnp.max(
                jnp.stack([jnp.max(jnp.abs(jnp.asarray(weights[n]["w"], jnp.float32)), 0) for n in names]),
                0,
            )
            c = tf.smooth_scale(jnp.asarray(act_absmax), w_absmax, cfg.smooth_alpha)
            c = c[main_idx] if gathered else c
        main_transform = tf.init_kron(k_main, dm, rotation=cfg.rotation_init, c=c)
    params["transform"] = main_transform
    params["act_clip"] = init_clip(()) if cfg.learn_clip else None

    for group, idx, k in (("text", text_idx, k_text), ("vision", vision_idx, k_vis)):
        # A one-channel group needs no transform: per-token activation and per-row weight
        # quantizers over a single channel are exact up to rounding, whatever 1 x 1 factor they
        # see, so such a factor could not be learned (its gradient is zero but for round-off).
        params[group] = (
            {"transform": tf.init_dense(k, int(idx.size), rotation=cfg.outlier_init) if idx.size > 1 else None,
             "act_clip": init_clip(()) if cfg.learn_clip else None}
            if idx.size else None
        )

    for n in names:
        w = np.asarray(weights[n]["w"], np.float32)
        d_out = w.shape[0]
        wc: Tree = {"w": jnp.asarray(w)}
        if "b" in weights[n] and weights[n]["b"] is not None:
            wc["b"] = jnp.asarray(weights[n]["b"], jnp.float32)
        wp: Tree = {"clip": init_clip((d_out,)) if cfg.learn_clip else None}
        for group, idx in (("text", text_idx), ("vision", vision_idx)):
            wp[f"{group}_clip"] = init_clip((d_out,)) if (cfg.learn_clip and idx.size) else None
        wm = main_cols(w)
        r_cws = rank_of(cfg.cws_ratio, dm, d_out) if cfg.cws else 0
        r_mac = rank_of(cfg.mac_ratio, dm, d_out) if cfg.mac else 0
        r_max = max(r_cws, r_mac)
        if r_max:
            basis = wm
            if cfg.svd_of == "transformed":
                # SVD of P0^-1 W_m^T: the branch basis is fixed in the transformed space.
                basis = np.asarray(tf.apply_weight(main_transform, jnp.asarray(wm)))
            u, l2 = _svd_top(basis, r_max)
        for branch, r, g0 in (("cws", r_cws, 1.0), ("mac", r_mac, cfg.mac_gate_init)):
            if r:
                wc[branch] = {"u": jnp.asarray(u[:, :r]), "l2": jnp.asarray(l2[:r])}
                wp[f"{branch}_gate"] = jnp.full((r,), g0, jnp.float32)
        consts["weights"][n] = wc
        params["weights"][n] = wp
    return params, consts


def _branch_in(inv: Tree | None, consts_b: Tree, gate: jax.Array, cfg: MethodConfig) -> jax.Array:
    """``L = P^-1 U diag(g)`` of shape ``(dm, r)`` (or ``U diag(g)`` with ``svd_of="transformed"``)."""
    u = consts_b["u"]
    if cfg.svd_of == "weight":
        u = tf.apply_inverse(inv, u.T).T
    return u * gate[None, :]


def main_weight(consts: Tree, w: jax.Array, cfg: MethodConfig) -> jax.Array:
    """``W_m``: the main-channel columns of ``w: (d_out, d)``."""
    sp = consts["split"]
    if cfg.main_path == "gathered":
        return jnp.take(w, sp["main_idx"], axis=1)
    return w * sp["main_mask"][None, :]


def residual_weight(params: Tree, consts: Tree, name: str, cfg: MethodConfig,
                    inv: Tree | None) -> tuple[jax.Array, Tree]:
    """``R^T = W_m P^-T - (L1 L2)^T`` (``(d_out, dm)``) and the branch factors ``{"cws"|"mac": (L_in, L_out)}``."""
    wp, wc = params["weights"][name], consts["weights"][name]
    wt = tf.apply_inverse(inv, main_weight(consts, wc["w"], cfg))
    branches = {}
    for branch in ("cws", "mac"):
        if branch in wc:
            branches[branch] = (_branch_in(inv, wc[branch], wp[f"{branch}_gate"], cfg),
                                wc[branch]["l2"])
    if "cws" in branches:
        l1, l2 = branches["cws"]
        wt = wt - (l1 @ l2).T
    return wt, branches


def outlier_weight(consts: Tree, name: str, group: str, inv: Tree | None) -> jax.Array:
    """``W_g P_g^-T`` for outlier group ``g`` (``(d_out, k)``), given :func:`~splitq_jax.transforms.inverse` of ``P_g``."""
    w = jnp.take(consts["weights"][name]["w"], consts["split"][f"{group}_idx"], axis=1)
    return tf.apply_inverse(inv, w)


def prequant_weights(params: Tree, consts: Tree, cfg: MethodConfig, bits: Bits) -> dict[str, Tree]:
    """Every stored weight of the group before quantization, with its quantizer settings.

    ``{name: {"main": R^T (d_out, dm), "cws": {"l_in": (r, dm), "l_out": (d_out, r)}, "mac": {...},
    "text": (d_out, k_t), "vision": (d_out, k_v)}}`` as :class:`WeightSpec` leaves. Low-rank factors
    are stored as linears (``l_in`` maps dm -> r, ``l_out`` maps r -> d_out), so their per-row scales
    are per output channel, like every other weight.
    """
    # Invert each transform once per call; every weight and branch of the group reuses it.
    inv = tf.inverse(params["transform"])
    outlier_inv = {g: tf.inverse(params[g]["transform"]) for g in ("text", "vision") if params.get(g) is not None}
    specs = {}
    for name, wp in params["weights"].items():
        wt, branches = residual_weight(params, consts, name, cfg, inv)
        spec: Tree = {"main": WeightSpec(wt, bits.w, wp["clip"], cfg.w_group_size)}
        for branch, (l_in, l_out) in branches.items():
            spec[branch] = {"l_in": WeightSpec(l_in.T, bits.aux_w, None),
                            "l_out": WeightSpec(l_out.T, bits.aux_w, None)}
        for group, g_inv in outlier_inv.items():
            spec[group] = WeightSpec(outlier_weight(consts, name, group, g_inv), bits.aux_w, wp[f"{group}_clip"])
        specs[name] = spec
    return specs


def fake_quant_weights(specs: dict[str, Tree], cfg: MethodConfig) -> dict[str, Tree]:
    """Fake-quantized (differentiable) versions of :func:`prequant_weights`' leaves."""
    return jax.tree_util.tree_map(
        lambda s: fake_quant(s.w, s.bits, symmetric=cfg.w_symmetric, clip=s.clip, group_size=s.group_size),
        specs, is_leaf=is_spec,
    )


def act_params(params: Tree) -> Tree:
    """The activation-side state of a group: transforms and activation clipping logits."""
    return {k: params.get(k) for k in ("transform", "act_clip", "text", "vision")}


def biases_of(consts: Tree) -> dict[str, jax.Array | None]:
    return {n: wc.get("b") for n, wc in consts["weights"].items()}


def group_forward(
    params: Tree,
    consts: Tree,
    x: jax.Array,
    text_mask: jax.Array | None,
    cfg: MethodConfig,
    *,
    quantize: bool = True,
) -> dict[str, jax.Array]:
    """Fake-quantized outputs of every linear in the group.

    Args:
      x: ``(..., N, d)``.
      text_mask: ``(..., N)`` bool, True on tokens that get the MAC branch (text tokens); None = none.
      quantize: False switches every quantizer off (the exact-identity check).
    Returns:
      ``{name: (..., N, d_out)}``.
    """
    bits = Bits.of(cfg, quantize)
    weights = fake_quant_weights(prequant_weights(params, consts, cfg, bits), cfg)
    return apply_group(act_params(params), consts["split"], weights, biases_of(consts), x, text_mask, cfg, bits)


def dense_forward(weights: Mapping[str, Mapping[str, jax.Array]], x: jax.Array) -> dict[str, jax.Array]:
    """Reference: ``{name: x W^T + b}`` in full precision."""
    out = {}
    for name, wb in weights.items():
        y = x @ wb["w"].T.astype(x.dtype)
        if wb.get("b") is not None:
            y = y + wb["b"].astype(x.dtype)
        out[name] = y
    return out
