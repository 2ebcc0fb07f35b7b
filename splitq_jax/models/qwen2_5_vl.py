"""Qwen2.5-VL in Flax NNX: vision tower, M-RoPE Qwen2 language model, greedy generation.

The model can run whole (``model(input_ids, ...)`` -> logits) or block by block, which is how the
calibration engine drives it::

    emb = model.embed(input_ids, pixel_values, image_grid_thw, attention_mask)
    cos, sin = model.rope(emb.position_ids)          # (B, N, head_dim) each
    mask = model.attention_mask(emb.modality_mask)    # (B, N, N) bool
    x = emb.hidden
    for block in model.blocks:
        x = block(x, cos, sin, mask)
    logits = model.head(x)

Inputs follow the HF processor's layout: ``pixel_values`` is ``(num_patches, C*T*P*P)`` with each
patch flattened in (channel, temporal, row, col) order -- the ``Conv3d`` kernel layout of the
checkpoint -- and patches ordered by 2x2 merge block (the processor's order). ``image_grid_thw`` is
``(num_images, 3)`` in patches.

Everything that depends on image sizes (window reordering, 3-D position ids) is planned on the
host with numpy, because those sizes decide array shapes; the heavy math is plain JAX.

A config with ``vision=None`` is a *text-only* model (no ``visual`` tower): the Qwen2 decoder on
its own. Every token is text there (placeholder ids included), positions are ``0, 1, 2, ...`` over
the real tokens on all three M-RoPE axes -- which is exactly Qwen2's 1-D rotary -- and passing
pixels raises ``ValueError``. Qwen2 checkpoints (``Qwen2ForCausalLM``, GGUF ``qwen2``) load this way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from splitq_jax.models import layers
from splitq_jax.models.decode import greedy_generate
from splitq_jax.models.layers import mrope_cos_sin
from splitq_jax.models.layers import (Array, Decoder, DecoderConfig, GatedMLP, KVCache, Linear, RMSNorm,
                                      count_params, dot_product_attention, make_attention_mask)

# Per-position modality codes returned by ``Qwen2_5_VL.embed``.
from splitq_jax.modality import PAD, TEXT, VISION  # noqa: F401


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Qwen2.5-VL vision transformer (a ViT with window attention and a 2x2 patch merger)."""

    # sizes
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # = language model hidden size
    # patching
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    # attention layout
    window_size: int = 112  # in pixels; a window covers window_size // patch_size patches per side
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    # misc
    tokens_per_second: int = 2  # video temporal position spacing
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2_5_VLConfig:
    """Full model: language decoder + vision tower + the token ids that tie them together.

    ``vision=None`` makes a text-only model (a Qwen2 decoder); see :func:`text_only_mrope_section`
    for a valid ``mrope_section`` at any head size (it does not change a text-only model's output).
    """

    text: DecoderConfig
    vision: VisionConfig | None = None
    # M-RoPE: head_dim/2 frequency slots split into (temporal, height, width) sections
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    # special tokens
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None
    # provenance
    hf_id: str | None = None

    def __post_init__(self):
        hd = self.text.resolved_head_dim
        if 2 * sum(self.mrope_section) != hd:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {hd // 2}")
        if self.vision is None:  # a text-only model never looks at the vision token ids
            return
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary ({self.text.vocab_size})")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError("vision.out_hidden_size must equal the language model hidden size")

    @property
    def text_only(self) -> bool:
        """True for a model without a vision tower (``vision=None``)."""
        return self.vision is None


def text_only_mrope_section(head_dim: int) -> tuple[int, int, int]:
    """An ``mrope_section`` for ``head_dim`` in Qwen2.5-VL's 2:3:3 proportion (16, 24, 24 at 128).

    With equal temporal/height/width positions -- all a text-only model ever sees -- the split does
    not change the rotary angles; it only has to sum to ``head_dim / 2``.
    """
    half = head_dim // 2
    if head_dim % 2 or half < 3:
        raise ValueError(f"head_dim must be even and at least 6, got {head_dim}")
    t = max(1, half // 4)
    h = (half - t) // 2
    return (t, h, half - t - h)


def _qwen_vision(out_hidden_size: int) -> VisionConfig:
    # Both released sizes share the same 32-layer, 1280-wide vision tower.
    return VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                        out_hidden_size=out_hidden_size, window_size=112,
                        fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)


CONFIGS: dict[str, Qwen2_5_VLConfig] = {
    "qwen2.5-vl-3b": Qwen2_5_VLConfig(
        text=DecoderConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                           num_heads=16, num_kv_heads=2, qkv_bias=True, rope_theta=1_000_000.0,
                           rms_norm_eps=1e-6, tie_word_embeddings=True),
        vision=_qwen_vision(2048),
        hf_id="Qwen/Qwen2.5-VL-3B-Instruct",
    ),
    "qwen2.5-vl-7b": Qwen2_5_VLConfig(
        text=DecoderConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                           num_heads=28, num_kv_heads=4, qkv_bias=True, rope_theta=1_000_000.0,
                           rms_norm_eps=1e-6, tie_word_embeddings=False),
        vision=_qwen_vision(3584),
        hf_id="Qwen/Qwen2.5-VL-7B-Instruct",
    ),
    # Tests and demos: every mechanism of the real model at toy sizes. Patch size 4 and window 16
    # px give 2x2-merged-unit windows, so small images already split into several windows.
    "qwen2.5-vl-tiny": Qwen2_5_VLConfig(
        text=DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                           num_heads=4, num_kv_heads=2, qkv_bias=True, rope_theta=10000.0,
                           rms_norm_eps=1e-6, tie_word_embeddings=False),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                            patch_size=4, temporal_patch_size=2, spatial_merge_size=2, window_size=16,
                            fullatt_block_indexes=(1,), tokens_per_second=2),
        mrope_section=(2, 3, 3),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=0,
    ),
    # The embedded default of scripts/calibrate.py: toy widths, but the real vocabulary, special
    # token ids and patch geometry, so the real Qwen2.5 tokenizer and image processor drive it.
    "qwen2.5-vl-mini": Qwen2_5_VLConfig(
        text=DecoderConfig(vocab_size=151936, hidden_size=128, intermediate_size=384, num_layers=4,
                           num_heads=4, num_kv_heads=2, qkv_bias=True, rope_theta=1_000_000.0,
                           rms_norm_eps=1e-6, tie_word_embeddings=True),
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                            window_size=112, fullatt_block_indexes=(1,), tokens_per_second=2),
        mrope_section=(4, 6, 6),
        pad_token_id=151643,
    ),
}


def get_config(name: str) -> Qwen2_5_VLConfig:
    """A named config (``qwen2.5-vl-3b``, ``qwen2.5-vl-7b``, ``qwen2.5-vl-tiny``, ``qwen2.5-vl-mini``)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown Qwen2.5-VL config {name!r}; known: {sorted(CONFIGS)}") from None


# --------------------------------------------------------------------------------------------
# Host-side planning (numpy): window reordering and 3-D position ids
# --------------------------------------------------------------------------------------------


class VisionPlan(NamedTuple):
    """Static layout of one vision forward, derived from ``grid_thw`` alone.

    window_index: ``(M,)`` permutation of merged units (M = patches / merge**2) that groups each
      attention window contiguously; the tower runs in this order and undoes it at the end.
    rot_pos: ``(L, 2)`` (row, col) patch coordinates in the *processor* order.
    full_segments, window_segments: ``(L,)`` segment ids in the *reordered* order; a patch attends to
      patches with the same id (one segment per image frame for full attention, one per window).
    """

    window_index: np.ndarray
    rot_pos: np.ndarray
    full_segments: np.ndarray
    window_segments: np.ndarray


def plan_vision(grid_thw: np.ndarray, cfg: VisionConfig) -> VisionPlan:
    """Window reordering, rotary coordinates and attention segments for images ``grid_thw (n, 3)``."""
    m = cfg.spatial_merge_size
    unit = m * m
    win = cfg.window_size // m // cfg.patch_size  # window side in merged units
    window_index, rot_pos, full_seg, win_seg = [], [], [], []
    offset = frame_id = window_id = 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist():
        if h % m or w % m:
            raise ValueError(f"grid {h}x{w} is not divisible by spatial_merge_size={m}")
        gh, gw = h // m, w // m
        # Patch coordinates in processor order: merge blocks row-major, 2x2 inside each block.
        rows = np.arange(h).reshape(gh, m, 1, 1).repeat(gw, 2).repeat(m, 3)
        cols = np.arange(w).reshape(1, 1, gw, m).repeat(gh, 0).repeat(m, 1)
        rc = np.stack([rows.transpose(0, 2, 1, 3).reshape(-1), cols.transpose(0, 2, 1, 3).reshape(-1)], -1)
        rot_pos.append(np.tile(rc, (t, 1)))
        # Windows tile the merged grid from the top-left; edge windows are smaller. Windows are
        # visited row-major per frame and merged units row-major inside a window.
        nwh, nww = -(-gh // win), -(-gw // win)
        for f in range(t):
            for wr in range(nwh):
                for wc in range(nww):
                    r = np.arange(wr * win, min((wr + 1) * win, gh))
                    c = np.arange(wc * win, min((wc + 1) * win, gw))
                    idx = (f * gh * gw + r[:, None] * gw + c[None, :]).reshape(-1)
                    window_index.append(idx + offset)
                    win_seg.append(np.full(idx.size * unit, window_id))
                    window_id += 1
            full_seg.append(np.full(h * w, frame_id))
            frame_id += 1
        offset += t * gh * gw
    return VisionPlan(np.concatenate(window_index), np.concatenate(rot_pos),
                      np.concatenate(full_seg), np.concatenate(win_seg))


def get_rope_index(input_ids: np.ndarray, cfg: Qwen2_5_VLConfig, *, attention_mask: np.ndarray | None = None,
                   image_grid_thw: np.ndarray | None = None, video_grid_thw: np.ndarray | None = None,
                   second_per_grid_ts: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """3-D (temporal, height, width) position ids, the HF ``get_rope_index`` rule.

    Per sequence, padding is dropped; runs of text get consecutive positions on all three axes; a
    vision item starting at position ``p`` gets ``(p + t*interval, p + row, p + col)`` over its merged
    grid, and the text after it resumes at ``p + max(h, w) / merge``. Images and videos are consumed
    in order of appearance across the batch. Padding positions are 0.

    Args:
      input_ids: ``(B, N)`` ints. attention_mask: ``(B, N)``, 0 at padding (left or right).
      image_grid_thw / video_grid_thw: ``(n, 3)`` patch grids. second_per_grid_ts: per video.
    Returns:
      ``position_ids (3, B, N)`` int32 and ``rope_deltas (B,)`` int32
      (= max position + 1 - number of real tokens; the offset of later generated tokens).
    """
    input_ids = np.asarray(input_ids)
    b, n = input_ids.shape
    valid = np.ones((b, n), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if cfg.vision is None:  # text-only: every token is text, placeholder ids included
        if image_grid_thw is not None or video_grid_thw is not None:
            raise ValueError("this is a text-only model (config.vision is None); it takes no image_grid_thw "
                             "or video_grid_thw. Use a Qwen2.5-VL checkpoint with a vision tower for images")
        pos = np.where(valid, np.cumsum(valid, axis=1) - 1, 0)
        deltas = pos.max(axis=1, initial=-1) + 1 - valid.sum(axis=1)
        return (np.broadcast_to(pos[None], (3, b, n)).astype(np.int32), deltas.astype(np.int32))
    m = cfg.vision.spatial_merge_size
    grids = {1: iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist() if image_grid_thw is not None else []),
             2: iter(np.asarray(video_grid_thw).reshape(-1, 3).tolist() if video_grid_thw is not None else [])}
    seconds = iter(second_per_grid_ts if second_per_grid_ts is not None else [])
    position_ids = np.zeros((3, b, n), np.int64)
    deltas = np.zeros((b,), np.int64)
    for bi in range(b):
        ids = input_ids[bi][valid[bi]]
        kind = np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))
        chunks, pos, i = [], 0, 0
        while i < len(ids):
            if kind[i] == 0:
                j = i
                while j < len(ids) and kind[j] == 0:
                    j += 1
                chunks.append(np.broadcast_to(np.arange(pos, pos + j - i), (3, j - i)))
                pos += j - i
                i = j
                continue
            try:
                t, h, w = next(grids[kind[i]])
            except StopIteration:
                raise ValueError("more image/video placeholder runs than entries in the grid_thw") from None
            interval = cfg.vision.tokens_per_second * next(seconds, 1.0) if kind[i] == 2 else 1
            gh, gw = h // m, w // m
            tt = (np.arange(t) * interval).astype(np.int64)
            tpos, hpos, wpos = np.meshgrid(tt, np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(np.stack([tpos.ravel(), hpos.ravel(), wpos.ravel()]) + pos)
            pos += max(h, w) // m
            i += t * gh * gw
        seq = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        if seq.shape[1] != len(ids):
            raise ValueError(f"sequence {bi}: placeholder tokens do not match the grids "
                             f"({seq.shape[1]} positions for {len(ids)} tokens)")
        position_ids[:, bi, valid[bi]] = seq
        deltas[bi] = (seq.max() + 1 if seq.size else 0) - len(ids)
    return position_ids.astype(np.int32), deltas.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------


class VisionAttention(nnx.Module):
    """Full multi-head attention with a fused ``qkv`` projection (bias) and 2-D rotary."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(d, 3 * d, bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        """``x (L, d)``, ``cos/sin (L, hd)`` float32, ``mask (L, L)`` bool -> ``(L, d)``."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # Rotation in float32 (the reference does the same), then back to the activation dtype.
        q = layers.apply_rope(q[None].astype(jnp.float32), cos[None], sin[None])[0].astype(x.dtype)
        k = layers.apply_rope(k[None].astype(jnp.float32), cos[None], sin[None])[0].astype(x.dtype)
        out = dot_product_attention(q[None], k[None], v[None], mask[None], self.head_dim ** -0.5)[0]
        return self.proj(out.reshape(n, -1))


class VisionBlock(nnx.Module):
    """Pre-norm ViT block with RMSNorm and a biased SwiGLU MLP."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=True, act=cfg.hidden_act,
                            dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        """``x (L, d)`` -> ``(L, d)``."""
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, concatenate each 2x2 block of patches, then a GELU MLP into the text width."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.unit = cfg.spatial_merge_size ** 2
        wide = cfg.hidden_size * self.unit
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, dtype=dtype)
        self.fc1 = Linear(wide, wide, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(wide, cfg.out_hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """``x (L, d)`` -> ``(L / merge**2, out_hidden)``; consecutive ``merge**2`` rows form one block."""
        x = self.ln_q(x).reshape(x.shape[0] // self.unit, -1)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    """Patch embedding -> window/full attention blocks -> patch merger."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        # The checkpoint's Conv3d has stride == kernel, i.e. a linear map of each flattened patch.
        self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: Array, grid_thw: np.ndarray) -> Array:
        """``pixel_values (L, C*T*P*P)``, ``grid_thw (n, 3)`` -> merged tokens ``(L / merge**2, out_hidden)``.

        Output rows follow the processor order, i.e. the order of the image placeholder tokens.
        Compiled once per distinct ``grid_thw`` (the grids fix every shape and permutation).
        """
        grid = tuple(tuple(int(v) for v in row) for row in np.asarray(grid_thw).reshape(-1, 3))
        n = sum(t * h * w for t, h, w in grid)
        if pixel_values.shape != (n, self.config.patch_dim):
            raise ValueError(f"pixel_values {pixel_values.shape} do not match grid_thw "
                             f"({n} patches of {self.config.patch_dim} values)")
        return _vision_forward(self, jnp.asarray(pixel_values), grid)

    def block_inputs(self, pixel_values: Array, grid: tuple[tuple[int, int, int], ...]) -> "VisionInputs":
        """What the first block sees: patch embeddings and rotary tables in window order, and the
        attention segments (uncompiled; ``grid`` must be concrete)."""
        cfg = self.config
        plan = plan_vision(np.asarray(grid), cfg)
        n = pixel_values.shape[0]
        unit = cfg.spatial_merge_size ** 2

        def to_windows(a):  # reorder whole merged units so that each window is contiguous
            return a.reshape(n // unit, unit, -1)[plan.window_index].reshape(n, -1)

        x = to_windows(self.patch_embed(pixel_values.astype(self.dtype)))
        # 2-D rotary: the first half of the slots rotate with the row, the second with the column.
        inv = layers.rope_inv_freq(cfg.head_dim // 2, cfg.rope_theta)
        pos = jnp.asarray(plan.rot_pos, jnp.float32)
        freqs = jnp.concatenate([pos[:, :1] * inv, pos[:, 1:] * inv], axis=-1)
        emb = to_windows(jnp.concatenate([freqs, freqs], axis=-1))
        return VisionInputs(x, jnp.cos(emb), jnp.sin(emb), plan.window_segments, plan.full_segments,
                            plan.window_index)

    def block_mask_kinds(self) -> tuple[str, ...]:
        """``"full"`` or ``"window"`` attention for each block."""
        cfg = self.config
        return tuple("full" if i in cfg.fullatt_block_indexes else "window" for i in range(cfg.depth))

    def merge(self, x: Array, window_index: np.ndarray) -> Array:
        """Last block's output (window order) -> merged tokens in the processor's order."""
        return self.merger(x)[np.argsort(window_index)]

    def forward(self, pixel_values: Array, grid: tuple[tuple[int, int, int], ...]) -> Array:
        """Uncompiled body of :meth:`__call__`; ``grid`` must be concrete."""
        inp = self.block_inputs(pixel_values, grid)
        masks = {"full": segment_mask(inp.full_segments), "window": segment_mask(inp.window_segments)}
        x = inp.x
        for block, kind in zip(self.blocks, self.block_mask_kinds()):
            x = block(x, inp.cos, inp.sin, masks[kind])
        return self.merge(x, inp.window_index)


class VisionInputs(NamedTuple):
    """:meth:`VisionTower.block_inputs`: ``x (L, d)``, ``cos/sin (L, head_dim)`` in window order;
    ``window_segments``/``full_segments (L,)`` attention segment ids; ``window_index`` the order."""

    x: Array
    cos: Array
    sin: Array
    window_segments: np.ndarray
    full_segments: np.ndarray
    window_index: np.ndarray


def segment_mask(segments) -> Array:
    """``(L, L)`` bool: a patch attends to the patches of its own segment."""
    seg = jnp.asarray(segments)
    return seg[:, None] == seg[None, :]


@functools.partial(nnx.jit, static_argnums=2)
def _vision_forward(tower: VisionTower, pixel_values: Array, grid) -> Array:
    return tower.forward(pixel_values, grid)


# --------------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------------


class Embedded(NamedTuple):
    """Output of :meth:`Qwen2_5_VL.embed`.

    hidden: ``(B, N, d)`` token embeddings with vision features scattered into the placeholders.
    position_ids: ``(3, B, N)`` int32 M-RoPE positions (0 at padding).
    modality_mask: ``(B, N)`` int32, 0 = pad, 1 = text, 2 = vision.
    """

    hidden: Array
    position_ids: Array
    modality_mask: Array


class Qwen2_5_VL(nnx.Module):
    """Qwen2.5-VL for conditional generation (``visual`` tower + ``language_model`` decoder).

    ``visual`` is None for a text-only config (``config.vision is None``).
    """

    def __init__(self, config: Qwen2_5_VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.visual = None if config.vision is None else VisionTower(config.vision, dtype=dtype, rngs=rngs)
        self.language_model = Decoder(config.text, dtype=dtype, rngs=rngs)

    # -- pieces -------------------------------------------------------------------------------

    @property
    def blocks(self):
        """The decoder layers; each is ``block(x, cos, sin, mask[, cache])``."""
        return self.language_model.layers

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, *,
              pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
              vision_encoder=None) -> Embedded:
        """Token + vision embeddings, M-RoPE positions and the modality mask.

        Args:
          input_ids: ``(B, N)`` with one placeholder (``image_token_id``) per merged vision token.
          pixel_values: ``(L, C*T*P*P)`` patches of all images in order; image_grid_thw: ``(n, 3)``.
          attention_mask: ``(B, N)``, 0 at padding (left or right); None = no padding.
          pixel_values_videos / video_grid_thw / second_per_grid_ts: the same for videos.
          vision_encoder: ``(pixels, grid_thw) -> merged features`` used instead of ``self.visual``
            (the quantized tower of a loaded checkpoint).
        Runs eagerly: placeholder positions and grids must be concrete.

        A text-only model (``config.vision is None``) takes ``input_ids`` and ``attention_mask``
        only; any pixels or grids raise ``ValueError``, and every real token is ``TEXT``.
        """
        cfg = self.config
        ids_np = np.asarray(input_ids)
        if ids_np.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {ids_np.shape}")
        valid = np.ones(ids_np.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        hidden = self.language_model.embed(jnp.asarray(ids_np))
        is_vision = np.zeros(ids_np.shape, bool)
        vision_inputs = ((cfg.image_token_id, pixel_values, image_grid_thw),
                         (cfg.video_token_id, pixel_values_videos, video_grid_thw))
        if self.visual is None:
            given = [name for name, v in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw),
                                          ("pixel_values_videos", pixel_values_videos),
                                          ("video_grid_thw", video_grid_thw),
                                          ("second_per_grid_ts", second_per_grid_ts)) if v is not None]
            if given:
                raise ValueError(f"this is a text-only model (config.vision is None, no vision tower) but "
                                 f"{', '.join(given)} were given; pass text only, or use a Qwen2.5-VL "
                                 f"checkpoint with a vision tower for images and videos")
            vision_inputs = ()
        for token, pix, grid in vision_inputs:
            where = (ids_np == token) & valid
            is_vision |= where
            if pix is None:
                if where.any():
                    raise ValueError(f"input_ids contain placeholder {token} but no pixels were given")
                continue
            feats = (self.visual if vision_encoder is None else vision_encoder)(jnp.asarray(pix), np.asarray(grid))
            if feats.shape[0] != where.sum():
                raise ValueError(f"{where.sum()} placeholder tokens ({token}) for {feats.shape[0]} vision tokens")
            rows, cols = np.nonzero(where)  # row-major = order of appearance
            hidden = hidden.at[rows, cols].set(feats.astype(hidden.dtype))
        position_ids, _ = get_rope_index(ids_np, cfg, attention_mask=valid, image_grid_thw=image_grid_thw,
                                         video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)
        modality = np.where(valid, np.where(is_vision, VISION, TEXT), PAD).astype(np.int32)
        return Embedded(hidden, jnp.asarray(position_ids), jnp.asarray(modality))

    def rope(self, position_ids: Array) -> tuple[Array, Array]:
        """``(cos, sin)`` each ``(B, N, head_dim)`` for M-RoPE ``position_ids (3, B, N)`` (or 1-D ``(B, N)``)."""
        t = self.config.text
        return mrope_cos_sin(position_ids, head_dim=t.resolved_head_dim, theta=t.rope_theta,
                             mrope_section=tuple(self.config.mrope_section), dtype=self.dtype)

    @staticmethod
    def attention_mask(modality_mask: Array) -> Array:
        """Causal + padding mask ``(B, N, N)`` bool from the ``(B, N)`` modality mask (0 = pad)."""
        return make_attention_mask(modality_mask != PAD)

    def head(self, hidden: Array) -> Array:
        """Final RMSNorm + LM head: ``(B, N, d)`` -> logits ``(B, N, vocab)``."""
        return layers.decoder_head(self.language_model, hidden)

    # -- whole model --------------------------------------------------------------------------

    def __call__(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, **vision_kw) -> Array:
        """Logits ``(B, N, vocab)`` (rows at padding positions are meaningless).

        Positions always come from :func:`get_rope_index`, which skips padding. HF's forward does
        the same whenever images are present; for a padded *text-only* batch it instead falls back
        to ``arange(N)`` (its ``generate`` again skips padding, as we do).
        """
        emb = self.embed(input_ids, pixel_values, image_grid_thw, attention_mask, **vision_kw)
        return layers.decoder_forward(self.language_model, emb.hidden, emb.position_ids, emb.modality_mask,
                        tuple(self.config.mrope_section))

    def generate(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, *,
                 max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, on_token=None, **vision_kw) -> np.ndarray:
        """Greedy decoding with a KV cache. Returns the new tokens ``(B, max_new_tokens)``;
        ``on_token(tokens (B,))`` streams each step's tokens.

        Batched prompts must be left-padded (the last column must be a real token). After a row
        emits an EOS token it is filled with ``pad_token_id`` (HF ``generate`` behaviour).
        """
        emb = self.embed(np.asarray(input_ids), pixel_values, image_grid_thw, attention_mask, **vision_kw)
        section = tuple(self.config.mrope_section)
        return greedy_generate(
            emb, lambda valid: layers.decoder_decoding(self.language_model, emb, valid, max_new_tokens, section),
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            default_pad_token_id=self.config.pad_token_id, on_token=on_token)

    def num_params(self) -> int:
        return count_params(self)


# Whole-model paths are one compiled program each (rope, mask, every block, head): compiling
# per shape once is far cheaper than dispatching the ops one by one.


def abstract_model(config: Qwen2_5_VLConfig, dtype=jnp.float32) -> Qwen2_5_VL:
    """The model with ``jax.ShapeDtypeStruct`` leaves (no memory), for shapes and parameter counts."""
    return nnx.eval_shape(lambda: Qwen2_5_VL(config, dtype=dtype, rngs=nnx.Rngs(0)))


__all__ = ["CONFIGS", "Embedded", "Qwen2_5_VL", "Qwen2_5_VLConfig", "VisionConfig", "VisionTower",
           "abstract_model", "get_config", "get_rope_index", "mrope_cos_sin", "plan_vision", "KVCache",
           "text_only_mrope_section"]
