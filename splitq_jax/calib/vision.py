"""Calibration streams of vision towers (one image per sample) and the method their blocks get.

The towers' block architectures are :mod:`splitq_jax.vision_block`; this module builds what the
whole-model pipeline streams through them (:class:`splitq_jax.pipeline.Stream`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from splitq_jax.config import MethodConfig, parse_bits
from splitq_jax.modality import PAD, VISION
from splitq_jax.models.family import family_of
from splitq_jax.pipeline import Stream


def vision_method_config(cfg: MethodConfig, bits: str | None = None) -> MethodConfig:
    """The method applied to vision blocks: ``cfg`` at ``bits`` (default: the same bits), with no
    text-outlier group and no MAC where the method has them (there are no text tokens in a vision
    tower; see the module doc). Other methods (the GPTQ family) run as they are."""
    changes: dict[str, Any] = {k: v for k, v in (("text_ratio", 0.0), ("mac", False)) if hasattr(cfg, k)}
    if bits is not None:
        changes["w_bits"], changes["a_bits"] = parse_bits(bits)
    return cfg.replace(**changes)


# ---------------------------------------------------------------------------------------------
# Calibration streams: one image per sample


def _pad_rows(arrays: Sequence[np.ndarray], n: int, value) -> np.ndarray:
    return np.stack([np.pad(a, [(0, n - a.shape[0])] + [(0, 0)] * (a.ndim - 1), constant_values=value)
                     for a in arrays])


def _segment_mask(segments: Sequence[np.ndarray], n: int) -> np.ndarray:
    """``(S, n, n)`` bool: tokens attend within their segment; padding (segment -1) only to padding."""
    seg = _pad_rows([np.asarray(s, np.int64) for s in segments], n, -1)
    return seg[:, :, None] == seg[:, None, :]


def qwen_images(batches: Sequence[dict]) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """Split calibration batches into ``(patches, (t, h, w))`` per image."""
    out = []
    for b in batches:
        if b.get("pixel_values") is None:
            continue
        pix, grids = np.asarray(b["pixel_values"]), np.asarray(b["image_grid_thw"]).reshape(-1, 3)
        start = 0
        for t, h, w in grids.tolist():
            out.append((pix[start:start + t * h * w], (t, h, w)))
            start += t * h * w
    return out


def qwen_vision_stream(model, batches: Sequence[dict]) -> Stream:
    """The inputs of the first Qwen2.5-VL vision block for every calibration image, with the window
    and full-attention masks (``Stream.masks``, chosen per block by ``Stream.block_masks``)."""
    images = qwen_images(batches)
    if not images:
        raise ValueError("--quantize-vision needs calibration samples with images; none of them has one")
    tower = model.visual
    xs, coss, sins, wins, fulls = [], [], [], [], []
    for pix, grid in images:
        inp = tower.block_inputs(jnp.asarray(pix), (grid,))
        xs.append(np.asarray(inp.x, np.float32))
        coss.append(np.asarray(inp.cos, np.float32))
        sins.append(np.asarray(inp.sin, np.float32))
        wins.append(inp.window_segments)
        fulls.append(inp.full_segments)
    n = max(a.shape[0] for a in xs)
    lengths = np.array([a.shape[0] for a in xs])
    modality = np.where(np.arange(n)[None] < lengths[:, None], VISION, PAD).astype(np.int32)
    masks = {"window": jnp.asarray(_segment_mask(wins, n)), "full": jnp.asarray(_segment_mask(fulls, n))}
    kinds = tower.block_mask_kinds()
    return Stream(jnp.asarray(_pad_rows(xs, n, 0.0)), jnp.asarray(_pad_rows(coss, n, 1.0)),
                  jnp.asarray(_pad_rows(sins, n, 0.0)), masks["full"], jnp.asarray(modality),
                  masks=masks, block_masks=kinds)


def clip_vision_stream(model, batches: Sequence[dict]) -> Stream:
    """The inputs of the first CLIP layer (pre-LN'd embeddings) for every calibration image."""
    pix = [np.asarray(b["pixel_values"]) for b in batches if b.get("pixel_values") is not None]
    if not pix:
        raise ValueError("--quantize-vision needs calibration samples with images; none of them has one")
    x = model.vision_tower.embed(jnp.asarray(np.concatenate(pix)))
    s, n, _ = x.shape
    empty = jnp.zeros((s, n, 0), jnp.float32)  # no rotary in CLIP
    return Stream(x.astype(jnp.float32), empty, empty, jnp.ones((s, n, n), bool),
                  jnp.full((s, n), VISION, jnp.int32))


def vision_stream(model, family: str, batches: Sequence[dict]) -> Stream:
    """The calibration stream of the first vision block (Qwen's windowed ViT, or CLIP / DINOv2)."""
    if family_of(family, model.config).vision_tower == "qwen_vit":
        return qwen_vision_stream(model, batches)
    return clip_vision_stream(model, batches)


__all__ = ["clip_vision_stream", "qwen_images", "qwen_vision_stream", "vision_method_config", "vision_stream"]
