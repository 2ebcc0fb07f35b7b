"""Activation statistics for inspection: per-channel magnitudes by modality (the paper's Fig. 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitq_jax import calibrate as cal
from splitq_jax.methods.splitq import mocd
from splitq_jax.block import GROUPS
from splitq_jax.config import MethodConfig
from splitq_jax.pipeline import Stream, block_config_of


@dataclass
class ChannelProfile:
    """Per-channel max |X| over text and over vision tokens at one layer's group input, and the
    channel split MOCD (or ``cfg.selector``) picks there."""

    layer: int
    group: str
    text_absmax: np.ndarray  # (d,)
    vision_absmax: np.ndarray  # (d,)
    split: mocd.ChannelSplit


def channel_profile(model, stream: Stream, layer: int, group: str, cfg: MethodConfig) -> ChannelProfile:
    """Run the full-precision blocks up to ``layer`` and profile the input of ``group`` there."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; choose one of {', '.join(GROUPS)}")
    blocks = list(model.blocks)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is out of range: the model has {len(blocks)} decoder blocks")
    bcfg = block_config_of(model.config.text)
    x = stream.x
    for layer_module in blocks[:layer]:
        x = cal.fp_block_jit(bcfg)(layer_module.block_params(), x, stream.cos, stream.sin, stream.mask)
    cap = cal.group_inputs_jit(bcfg)(blocks[layer].block_params(), x, stream.cos, stream.sin, stream.mask)
    xs = np.abs(np.asarray(cap[group]).reshape(-1, cap[group].shape[-1]))
    modality = np.asarray(stream.modality).reshape(-1)
    is_text = np.asarray(cal.text_mask_of(modality, cfg))
    is_vis = modality == cal.VISION
    d = xs.shape[-1]
    text_max = xs[is_text].max(0) if is_text.any() else np.zeros(d)
    vis_max = xs[is_vis].max(0) if is_vis.any() else np.zeros(d)
    codes = np.where(is_vis, 2, np.where(is_text, 1, 0))
    k_t, k_v = mocd.channel_counts(d, cfg.text_ratio, cfg.vision_ratio)
    split = mocd.select_channels(np.asarray(cap[group]).reshape(-1, d), codes, k_t=k_t, k_v=k_v,
                                 selector=cfg.selector if cfg.selector != "none" else "mocd",
                                 n_clusters=cfg.n_clusters, instability=cfg.instability, seed=cfg.seed,
                                 max_text_tokens=8192, empty_cluster=cfg.empty_cluster)
    return ChannelProfile(layer, group, text_max, vis_max, split)


def top_channels(absmax: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` channels of largest ``absmax``, ascending channel order."""
    return np.sort(np.argsort(-np.asarray(absmax), kind="stable")[:k])


def plot_profile(profile: ChannelProfile, path: str, title: str = "") -> None:
    """Two panels (text tokens, vision tokens) of per-channel max |X|, selected channels marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    ch = np.arange(profile.text_absmax.size)
    for ax, values, name in ((axes[0], profile.text_absmax, "text tokens"),
                             (axes[1], profile.vision_absmax, "vision tokens")):
        ax.plot(ch, values, lw=0.6, color="0.4")
        ax.scatter(profile.split.text, values[profile.split.text], s=14, color="tab:red",
                   label=f"text-outlier channels (C_t, {len(profile.split.text)})", zorder=3)
        ax.scatter(profile.split.vision, values[profile.split.vision], s=14, color="tab:blue", marker="^",
                   label=f"vision-outlier channels (C_v, {len(profile.split.vision)})", zorder=3)
        ax.set_ylabel(f"max |X| over {name}")
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("input channel")
    fig.suptitle(title or f"layer {profile.layer}, {profile.group} input")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
