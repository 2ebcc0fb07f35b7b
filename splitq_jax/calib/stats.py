"""The statistics pass of one block: group inputs captured batch by batch, fed to collectors.

The full-precision block runs over the calibration samples ``batch_size`` at a time; each group's
input (what its linears read) goes to the device collectors the method asks for
(:mod:`splitq_jax.calib.collectors`) and, for groups MOCD splits, to the host-side text-token
reservoir of :class:`splitq_jax.methods.splitq.mocd.MocdStats`. Nothing pools every token of the calibration
set: memory is one batch of captures plus the collectors' fixed-size states.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import sharding
from splitq_jax.block import BlockConfig, fp_block
from splitq_jax.calib import collectors as col
from splitq_jax.modality import PAD, VISION, text_mask

Tree = dict[str, Any]

# Text tokens MOCD's rank statistics (Eq. 9-10) keep per group input: a uniform reservoir sample
# beyond this many (4096 x 11008 float32 is 180 MB; 8192 keeps every token of a 128-sample run).
MOCD_CAPACITY = 8192


@dataclass
class GroupStats:
    """What the statistics pass found for one group input of width ``d``.

    absmax: (d,) max |x| over non-pad tokens, or None when not collected; text_idx / vision_idx:
    MOCD's outlier channels (empty: no split); collected: every collector's result by name.
    """

    absmax: jax.Array | None = None
    text_idx: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    vision_idx: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    collected: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    """How to choose a group's outlier channels from its MOCD statistics (``mocd.select_from_stats``)."""

    text_ratio: float
    vision_ratio: float
    selector: str = "mocd"
    n_clusters: int = 3
    instability: str = "kmeans"
    empty_cluster: str = "farthest"
    kmeans_starts: int = 2
    text_tokens: str = "non_vision"  # which tokens count as text (modality.text_mask)
    seed: int = 0


@functools.lru_cache(maxsize=16)
def group_inputs_jit(bcfg: BlockConfig) -> Callable:
    """``jit`` of the FP block returning each group's input: ``(params, x, cos, sin, mask) -> {group: x}``."""
    @jax.jit
    def capture(params, x, cos, sin, mask):
        cap: dict[str, jax.Array] = {}
        fp_block(params, x, cos, sin, mask, bcfg, capture=cap)
        return cap

    return capture


def token_weight(data) -> jax.Array:
    """``(S, N)`` float32 per-token weights of block data: its own, else 1 on non-pad tokens."""
    if getattr(data, "weight", None) is not None:
        return jnp.asarray(data.weight, jnp.float32)
    return (jnp.asarray(data.modality) != PAD).astype(jnp.float32)


def collect_group_stats(block_params: Tree, data, bcfg: BlockConfig, wanted: dict[str, tuple[str, ...]],
                        split: dict[str, Selection] | None = None, batch_size: int = 4) -> dict[str, GroupStats]:
    """Run the full-precision block over ``data`` (a ``BlockData``) and accumulate, per group,
    the device statistics ``wanted[group]`` (names of :data:`collectors.COLLECTORS`) and, for the
    groups in ``split``, MOCD's statistics and channel selection."""
    from splitq_jax.methods.splitq import mocd

    split = split or {}
    moc: dict[str, Any] = {}
    accs: dict[str, col.Accumulator] = {}
    # On a data mesh each batch is split over the devices (masked padding samples carry weight 0
    # and modality pad, so they count nowhere); the collectors' reductions are then global.
    block_params = sharding.replicate(block_params)
    for b in sharding.batches(data, batch_size):
        cap = group_inputs_jit(bcfg)(block_params, b.x, b.cos, b.sin, b.mask)
        modality = jnp.asarray(b.modality).reshape(-1)
        w = token_weight(b).reshape(-1)
        for g in bcfg.groups:
            x = cap[g].reshape(-1, cap[g].shape[-1])
            if wanted.get(g):
                if g not in accs:
                    accs[g] = col.Accumulator(tuple(wanted[g]), int(x.shape[-1]))
                accs[g].update(col.Tokens(x, modality, w))
            if g in split:
                sel = split[g]
                if g not in moc:
                    moc[g] = mocd.init_stats(int(x.shape[-1]), capacity=MOCD_CAPACITY, seed=sel.seed)
                # MOCD's codes: vision 2, text (under the text-token choice) 1, anything else ignored.
                codes = jnp.where(modality == VISION, 2, jnp.where(text_mask(modality, sel.text_tokens), 1, 0))
                moc[g] = mocd.update_stats(moc[g], np.asarray(x), np.asarray(codes, np.int32))
    stats = {}
    for g in bcfg.groups:
        collected = accs[g].results() if g in accs else {}
        ab = collected.get("absmax")
        st = GroupStats(absmax=None if ab is None else jnp.asarray(ab.absmax), collected=collected)
        if g in split:
            sel = split[g]
            k_t, k_v = mocd.channel_counts(moc[g].all_max.shape[0], sel.text_ratio, sel.vision_ratio)
            chosen = mocd.select_from_stats(
                moc[g], k_t=k_t, k_v=k_v, selector=sel.selector, n_clusters=sel.n_clusters,
                instability=sel.instability, seed=sel.seed, empty_cluster=sel.empty_cluster,
                kmeans_starts=sel.kmeans_starts)
            st.text_idx = np.asarray(chosen.text, np.int32)
            st.vision_idx = np.asarray(chosen.vision, np.int32)
        stats[g] = st
    return stats
