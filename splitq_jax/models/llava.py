"""LLaVA-1.5 in Flax NNX: CLIP ViT-L/14 tower, two-layer GELU projector, Llama decoder.

Same driving API as :mod:`splitq_jax.models.qwen2_5_vl`, so the calibration engine runs either
family unchanged::

    emb = model.embed(input_ids, pixel_values, attention_mask)
    cos, sin = model.rope(emb.position_ids)          # (B, N, head_dim) each
    mask = model.attention_mask(emb.modality_mask)    # (B, N, N) bool
    x = emb.hidden
    for block in model.blocks:
        x = block(x, cos, sin, mask)
    logits = model.head(x)

Inputs follow the HF processor's layout: ``pixel_values`` is ``(num_images, 3, 336, 336)`` and
``input_ids`` hold one ``image_token_id`` per vision token (576 per image at 336 px / 14 px
patches, the class token dropped). Vision features come from the tower's second-to-last layer
(``vision_feature_layer = -2``); the tower's last layer and ``post_layernorm`` are kept so that
checkpoints round-trip and parameter counts match the release, but they are never run.

A second variant (``vision_tower="dinov2"``) swaps the CLIP tower for the DINOv2 ViT of
:mod:`splitq_jax.models.dinov2` and may use any :class:`DecoderConfig` (Qwen2: q/k/v biases, rope
theta 1e6). Its image features are the tower's final LayerNorm applied to the chosen hidden state
(``vision_feature_layer=-1``: HF ``last_hidden_state``), average-pooled ``vision_pool x
vision_pool`` over the patch grid, the class token dropped (``"default"``) or kept (``"full"``), then
projected by the same two-layer GELU MLP. Its input side is ``image_size`` (224 px: a 16x16 grid,
pooled 2x2 -> 64 tokens) and its prompts use the Qwen chat template with ``<|image_pad|>`` as the
placeholder, wrapped in ``<|vision_start|>``/``<|vision_end|>`` (``prompt_format="qwen"``).
``easyvqa-vlm-0.5b`` (``splitq_jax/models/converters/easyvqa_vlm.py``) is the trained instance: DINOv2-S/14 +
Qwen2.5-Coder-0.5B + a projector trained on easy-vqa (``scripts/train_projector.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from splitq_jax import preprocess as pp
from splitq_jax.models.decode import greedy_generate
from splitq_jax.models.layers import (
    decoder_decoding, decoder_forward,
    Array,
    Decoder,
    DecoderConfig,
    LayerNorm,
    Linear,
    count_params,
    dot_product_attention,
    get_activation,
    make_attention_mask,
)

# Per-position modality codes returned by ``Llava.embed`` (the project-wide convention).
from splitq_jax.modality import PAD, TEXT, VISION  # noqa: F401


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPVisionConfig:
    """CLIP vision transformer (pre-LN ViT with a class token and learned positions)."""

    # sizes
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    # patching
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    # misc
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlavaConfig:
    """Full model: CLIP tower + projector + Llama decoder and the ids that tie them together."""

    text: DecoderConfig
    vision: CLIPVisionConfig
    # which tower outputs feed the projector: index into (embeddings, layer 1, ..., layer L)
    vision_feature_layer: int | tuple[int, ...] = -2
    # "default" drops the class token, "full" keeps it
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    # special tokens
    image_token_id: int = 32000
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = 32001
    # provenance
    hf_id: str | None = None
    # Vision tower: "clip" (LLaVA-1.5, ``vision`` is a CLIPVisionConfig) or "dinov2" (``vision`` is a
    # splitq_jax.models.dinov2.Dinov2Config; see the module docstring).
    vision_tower: str = "clip"
    # DINOv2 only: input side in pixels (the tower resamples its position grid to it); CLIP's input
    # side is ``vision.image_size``.
    image_size: int | None = None
    # DINOv2 only: average-pool the patch grid by vision_pool x vision_pool before the projector.
    vision_pool: int = 1
    # Prompt layout: "llava" (``USER: <image>\n... ASSISTANT:``) or "qwen" (Qwen chat template,
    # ``<|vision_start|><|image_pad|>...<|vision_end|>``); see splitq_jax.calib_data.
    prompt_format: str = "llava"

    def __post_init__(self):
        if self.vision_tower not in VISION_TOWERS:
            raise ValueError(f"vision_tower must be one of {VISION_TOWERS}, got {self.vision_tower!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.vision_pool < 1:
            raise ValueError(f"vision_pool must be >= 1, got {self.vision_pool}")
        if self.vision_tower == "clip":
            if not isinstance(self.vision, CLIPVisionConfig):
                raise ValueError(f"vision_tower='clip' needs a CLIPVisionConfig, got {type(self.vision).__name__}")
            if self.vision_pool != 1 or self.image_size is not None:
                raise ValueError("vision_pool and image_size apply to the DINOv2 tower only; the CLIP tower's "
                                 "input side is vision.image_size and its patches are not pooled")
        else:
            if not isinstance(self.vision, _dinov2().Dinov2Config):
                raise ValueError(f"vision_tower='dinov2' needs a Dinov2Config, got {type(self.vision).__name__}")
            if self.image_size is None:
                raise ValueError("vision_tower='dinov2' needs image_size (the input side in pixels, e.g. 224)")
            g = self.image_size // self.vision.patch_size
            if g < 1 or g % self.vision_pool:
                raise ValueError(f"a {self.image_size} px input gives a {g}x{g} patch grid, which vision_pool="
                                 f"{self.vision_pool} does not divide; choose image_size = k * "
                                 f"{self.vision.patch_size * self.vision_pool}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', "
                             f"got {self.vision_feature_select_strategy!r}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id={self.image_token_id} is outside the vocabulary ({self.text.vocab_size})")
        n = self.vision.num_layers
        for layer in self.feature_layers:
            if not -(n + 1) <= layer <= n:
                raise ValueError(f"vision_feature_layer {layer} is out of range for a {n}-layer tower")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Feature layers as a tuple (one entry for the usual int setting)."""
        v = self.vision_feature_layer
        return (v,) if isinstance(v, int) else tuple(v)

    @property
    def hidden_state_indices(self) -> tuple[int, ...]:
        """Feature layers as indices into ``hidden_states`` (0 = embeddings, i = output of layer i)."""
        n = self.vision.num_layers
        return tuple(i % (n + 1) for i in self.feature_layers)

    @property
    def used_vision_layers(self) -> int:
        """How many CLIP layers the features need (the deepest feature layer); later layers never
        reach the language model."""
        return max(self.hidden_state_indices)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens of the tower's output before the patches (class token, DINOv2 registers)."""
        return 1 + (self.vision.num_register_tokens if self.vision_tower == "dinov2" else 0)

    @property
    def input_size(self) -> int:
        """Side in pixels of the square ``pixel_values`` the tower takes."""
        return self.image_size if self.vision_tower == "dinov2" else self.vision.image_size

    @property
    def patch_grid(self) -> tuple[int, int]:
        """The tower's patch grid ``(gh, gw)`` at :attr:`input_size` (before pooling)."""
        g = self.input_size // self.vision.patch_size
        return g, g

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image (576 for 336 px / 14 px patches with the class token dropped; 64
        for a DINOv2 tower at 224 px pooled 2x2)."""
        if self.vision_tower == "clip":
            return self.vision.num_patches + (self.vision_feature_select_strategy == "full")
        gh, gw = self.patch_grid
        n = (gh // self.vision_pool) * (gw // self.vision_pool)
        return n + (self.num_prefix_tokens if self.vision_feature_select_strategy == "full" else 0)

    def image_processor(self) -> pp.LlavaImageConfig:
        """Preprocessing that fits the tower: CLIP's is llava-hf's (CLIP mean/std, short side to
        the input size, centre crop); DINOv2's the same geometry at :attr:`image_size` with ImageNet
        mean/std, its ``num_image_tokens`` counting pooled tokens."""
        if self.vision_tower == "clip":
            v = self.vision
            return pp.LlavaImageConfig(shortest_edge=v.image_size, crop_size=v.image_size, patch_size=v.patch_size)
        from splitq_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD

        return PooledImageConfig(shortest_edge=self.image_size, crop_size=self.image_size,
                                 patch_size=self.vision.patch_size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                                 pool=self.vision_pool,
                                 prefix_tokens=self.num_prefix_tokens
                                 if self.vision_feature_select_strategy == "full" else 0)

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, hf_id: str | None = None) -> LlavaConfig:
        """Build from an HF ``config.json`` dict (``model_type == "llava"``), old or new style."""
        t, v = d.get("text_config") or {}, d.get("vision_config") or {}
        # Old hub configs omit text_config fields that equal Llama-2-7B's defaults.
        hidden = t.get("hidden_size", 4096)
        heads = t.get("num_attention_heads", 32)
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported rope scaling {rope}")
        text = DecoderConfig(
            vocab_size=t.get("vocab_size", 32000), hidden_size=hidden,
            intermediate_size=t.get("intermediate_size", 11008), num_layers=t.get("num_hidden_layers", 32),
            num_heads=heads, num_kv_heads=t.get("num_key_value_heads") or heads,
            # None = hidden // heads, the Llama default (keeps named configs comparable)
            head_dim=None if t.get("head_dim") in (None, hidden // heads) else t["head_dim"], qkv_bias=bool(t.get("attention_bias", False)),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
            rms_norm_eps=t.get("rms_norm_eps", 1e-5), hidden_act=t.get("hidden_act", "silu"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))))
        if t.get("mlp_bias"):
            raise ValueError("Llama decoders with mlp_bias are not supported")
        vision = CLIPVisionConfig(
            hidden_size=v.get("hidden_size", 1024), intermediate_size=v.get("intermediate_size", 4096),
            num_layers=v.get("num_hidden_layers", 24), num_heads=v.get("num_attention_heads", 16),
            image_size=v.get("image_size", 336), patch_size=v.get("patch_size", 14),
            num_channels=v.get("num_channels", 3), layer_norm_eps=v.get("layer_norm_eps", 1e-5),
            hidden_act=v.get("hidden_act", "quick_gelu"))
        layer = d.get("vision_feature_layer", -2)
        eos = t.get("eos_token_id", 2)
        return cls(
            text=text, vision=vision,
            vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
            vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
            projector_hidden_act=d.get("projector_hidden_act", "gelu"),
            projector_bias=bool(d.get("multimodal_projector_bias", True)),
            image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
            bos_token_id=t.get("bos_token_id", 1),
            eos_token_id=tuple(np.atleast_1d(eos).tolist()) if eos is not None else (),
            pad_token_id=d.get("pad_token_id", t.get("pad_token_id")),
            hf_id=hf_id)


VISION_TOWERS = ("clip", "dinov2")
PROMPT_FORMATS = ("llava", "qwen")


def _dinov2():
    """:mod:`splitq_jax.models.dinov2`, imported on use (only DINOv2-tower models need it)."""
    from splitq_jax.models import dinov2

    return dinov2


@dataclasses.dataclass(frozen=True, kw_only=True)
class PooledImageConfig(pp.LlavaImageConfig):
    """LLaVA-style preprocessing for a tower whose patch grid is average-pooled ``pool x pool``
    (``num_image_tokens`` counts pooled tokens, plus ``prefix_tokens`` kept class/register tokens)."""

    pool: int = 1
    prefix_tokens: int = 0

    @property
    def num_image_tokens(self) -> int:
        g = (self.crop_size // self.patch_size) // self.pool
        return g * g + self.prefix_tokens


def _llama2_text(hidden: int, intermediate: int, layers: int, heads: int) -> DecoderConfig:
    # LLaVA-1.5's Vicuna-1.5 decoders: Llama-2 shapes, 32000 + <image> + <pad> + 62 spare rows.
    return DecoderConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate,
                         num_layers=layers, num_heads=heads, num_kv_heads=heads, qkv_bias=False,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


CONFIGS: dict[str, LlavaConfig] = {
    "llava-1.5-7b": LlavaConfig(text=_llama2_text(4096, 11008, 32, 32), vision=CLIPVisionConfig(),
                                hf_id="llava-hf/llava-1.5-7b-hf"),
    "llava-1.5-13b": LlavaConfig(text=_llama2_text(5120, 13824, 40, 40), vision=CLIPVisionConfig(),
                                 hf_id="llava-hf/llava-1.5-13b-hf"),
    # Tests and demos: every mechanism at toy sizes (GQA in the decoder, 3 tower layers so that
    # the feature layer is a middle one, 2x2 patches per image = 4 image tokens).
    "llava-1.5-tiny": LlavaConfig(
        text=DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                           num_heads=4, num_kv_heads=2, qkv_bias=False, rope_theta=10000.0,
                           rms_norm_eps=1e-5, tie_word_embeddings=False),
        vision=CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=2,
                                image_size=28, patch_size=14),
        image_token_id=120, bos_token_id=1, eos_token_id=(2,), pad_token_id=0),
}


def dinov2_llava_config(text: DecoderConfig, vision=None, *, image_size: int = 224, pool: int = 2,
                        image_token_id: int = pp.QWEN_VISION_TOKEN_IDS["<|image_pad|>"],
                        eos_token_id: tuple[int, ...] = (151645,), pad_token_id: int | None = 151643,
                        hf_id: str | None = None) -> LlavaConfig:
    """The DINOv2 + Qwen-template variant: DINOv2 tower (default DINOv2-S/14), final-LayerNorm
    features pooled ``pool x pool`` with the class token dropped, a two-layer GELU projector
    (``vision.hidden_size -> text.hidden_size -> text.hidden_size``), Qwen chat prompts with
    ``<|image_pad|>`` (151655) placeholders. Defaults are the Qwen2.5 ids (eos ``<|im_end|>``,
    pad ``<|endoftext|>``); there is no BOS."""
    vision = _dinov2().get_config("dinov2-small") if vision is None else vision
    return LlavaConfig(text=text, vision=vision, vision_tower="dinov2", image_size=image_size, vision_pool=pool,
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", projector_bias=True, prompt_format="qwen",
                       image_token_id=image_token_id, bos_token_id=None, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, hf_id=hf_id)


def tiny_dinov2_llava_config() -> LlavaConfig:
    """Tests: ``dinov2-tiny`` tower at 56 px (4x4 patches pooled 2x2 = 4 image tokens) and a tiny
    Qwen2-style decoder (q/k/v biases, GQA, rope theta 1e6) whose vocabulary holds the Qwen2.5
    special-token ids, so the real Qwen tokenizer's prompts fit it."""
    text = DecoderConfig(vocab_size=151936, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=False)
    return dinov2_llava_config(text, _dinov2().get_config("dinov2-tiny"), image_size=56, pool=2)


def get_config(name: str) -> LlavaConfig:
    """A named config (``llava-1.5-7b``, ``llava-1.5-13b``, ``llava-1.5-tiny``; ``llava-dinov2-tiny``
    for the DINOv2 + Qwen-template variant at test size)."""
    if name == "llava-dinov2-tiny":  # built on use: it needs splitq_jax.models.dinov2
        return tiny_dinov2_llava_config()
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown LLaVA config {name!r}; known: {sorted(CONFIGS) + ['llava-dinov2-tiny']}") from None


# --------------------------------------------------------------------------------------------
# CLIP vision tower
# --------------------------------------------------------------------------------------------


class CLIPAttention(nnx.Module):
    """Full multi-head self-attention, biased q/k/v/out projections."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """``(B, L, d)`` -> ``(B, L, d)``."""
        b, n, _ = x.shape
        split = lambda y: y.reshape(b, n, self.num_heads, self.head_dim)  # noqa: E731
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    None, self.head_dim ** -0.5)
        return self.out_proj(out.reshape(b, n, -1))


class CLIPMLP(nnx.Module):
    """``fc2(act(fc1(x)))`` with biases."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.act_name = cfg.hidden_act
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(get_activation(self.act_name)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN ViT block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``. ``(B, L, d)`` -> same."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionTower(nnx.Module):
    """Patch embedding + class token + positions -> pre-LN -> encoder layers.

    ``hidden_states(pixel_values, upto)`` returns the list HF calls ``hidden_states``: entry 0 is
    the (pre-LN'd) embedding, entry i the output of layer i.
    """

    def __init__(self, cfg: CLIPVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        # Conv2d weight (d, C, P, P) with stride == kernel: a linear map of each patch.
        self.patch_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d, c, p, p), dtype))
        self.class_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,), dtype))
        self.position_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.num_patches + 1, d), dtype))
        self.pre_layrnorm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)  # HF's spelling
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype)  # pooled output only

    def embed(self, pixel_values: Array) -> Array:
        """``(B, C, H, W)`` -> ``(B, 1 + num_patches, d)``, class token first, patches row-major."""
        cfg = self.config
        b, c, h, w = pixel_values.shape
        p = cfg.patch_size
        if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
            raise ValueError(f"pixel_values {pixel_values.shape} must be (B, {cfg.num_channels}, "
                             f"{cfg.image_size}, {cfg.image_size})")
        x = pixel_values.astype(self.dtype).reshape(b, c, h // p, p, w // p, p)
        patches = jnp.einsum("bcipjq,dcpq->bijd", x, self.patch_embedding[...]).reshape(b, -1, cfg.hidden_size)
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...]
        return self.pre_layrnorm(x)

    def hidden_states(self, pixel_values: Array, upto: int | None = None) -> list[Array]:
        """``[embeddings, layer_1, ..., layer_upto]``, each ``(B, 1 + num_patches, d)``."""
        upto = self.config.num_layers if upto is None else upto
        states = [self.embed(pixel_values)]
        for layer in self.layers[:upto]:
            states.append(layer(states[-1]))
        return states


class Projector(nnx.Module):
    """``linear_2(gelu(linear_1(x)))``: vision width (times feature layers) -> text width."""

    def __init__(self, d_in: int, d_out: int, *, act: str, bias: bool, dtype, rngs: nnx.Rngs):
        self.act_name = act
        self.linear_1 = Linear(d_in, d_out, bias=bias, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(d_out, d_out, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(get_activation(self.act_name)(self.linear_1(x)))


# --------------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------------


class Embedded(NamedTuple):
    """Output of :meth:`Llava.embed`.

    hidden: ``(B, N, d)`` token embeddings with image features scattered into the placeholders.
    position_ids: ``(B, N)`` int32 1-D positions counting real tokens only (0 at padding).
    modality_mask: ``(B, N)`` int32, 0 = pad, 1 = text, 2 = vision.
    """

    hidden: Array
    position_ids: Array
    modality_mask: Array


class Llava(nnx.Module):
    """LLaVA for conditional generation (``vision_tower`` + ``multi_modal_projector`` + ``language_model``)."""

    def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        if config.vision_tower == "dinov2":
            self.vision_tower = _dinov2().Dinov2(config.vision, dtype=dtype, rngs=rngs)
        else:
            self.vision_tower = CLIPVisionTower(config.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Projector(
            config.vision.hidden_size * len(config.feature_layers), config.text.hidden_size,
            act=config.projector_hidden_act, bias=config.projector_bias, dtype=dtype, rngs=rngs)
        self.language_model = Decoder(config.text, dtype=dtype, rngs=rngs)

    # -- pieces -------------------------------------------------------------------------------

    @property
    def blocks(self):
        """The decoder layers; each is ``block(x, cos, sin, mask[, cache])``."""
        return self.language_model.layers

    def image_features(self, pixel_values: Array) -> Array:
        """``(num_images, 3, S, S)`` -> ``(num_images, num_image_tokens, d_text)``."""
        return _image_features_jit(self, jnp.asarray(pixel_values))

    def _image_features(self, pixel_values: Array) -> Array:
        cfg = self.config
        if cfg.vision_tower == "dinov2":
            s, c = cfg.input_size, cfg.vision.num_channels
            if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
                raise ValueError(f"pixel_values {pixel_values.shape} must be (B, {c}, {s}, {s}); preprocess with "
                                 f"config.image_processor()")
        states = self.vision_tower.hidden_states(pixel_values, upto=cfg.used_vision_layers)
        return self.project_features(states)

    def select_features(self, states: Sequence[Array]) -> Array:
        """``hidden_states`` of the tower -> the projector's input ``(num_images, num_image_tokens,
        d_vision * len(feature_layers))``: CLIP's chosen states (class token dropped by
        ``"default"``); DINOv2's after the final LayerNorm, pooled ``vision_pool x vision_pool``."""
        cfg = self.config
        feats = [states[i] for i in cfg.hidden_state_indices]
        prefix = cfg.num_prefix_tokens
        if cfg.vision_tower == "dinov2":
            pool = _dinov2().pool_patch_tokens
            feats = [pool(self.vision_tower.layernorm(f), cfg.patch_grid, cfg.vision_pool, num_prefix=prefix)
                     for f in feats]
        if cfg.vision_feature_select_strategy == "default":
            feats = [f[:, prefix:] for f in feats]  # drop the class (and register) tokens
        return jnp.concatenate(feats, axis=-1)

    def project_features(self, states: Sequence[Array]) -> Array:
        """``hidden_states`` of the tower (at least up to the deepest feature layer) -> projected
        image features ``(num_images, num_image_tokens, d_text)``."""
        return self.multi_modal_projector(self.select_features(states))

    def embed(self, input_ids, pixel_values=None, attention_mask=None, *, vision_encoder=None) -> Embedded:
        """Token + image embeddings, 1-D positions and the modality mask.

        Args:
          input_ids: ``(B, N)`` with ``num_image_tokens`` placeholders (``image_token_id``) per image.
          pixel_values: ``(num_images, 3, S, S)``, images in order of appearance across the batch.
          attention_mask: ``(B, N)``, 0 at padding (left or right); None = no padding.
          vision_encoder: ``pixel_values -> (num_images, num_image_tokens, d_text)`` used instead of
            :meth:`image_features` (the quantized tower of a loaded checkpoint).
        Runs eagerly: placeholder positions must be concrete.
        """
        cfg = self.config
        ids_np = np.asarray(input_ids)
        valid = np.ones(ids_np.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        is_vision = (ids_np == cfg.image_token_id) & valid
        n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
        if is_vision.sum() != n_images * cfg.num_image_tokens:
            raise ValueError(f"input_ids hold {is_vision.sum()} image tokens ({cfg.image_token_id}) but "
                             f"{n_images} image(s) need {n_images * cfg.num_image_tokens} "
                             f"({cfg.num_image_tokens} each)")
        if n_images:
            encode = self.image_features if vision_encoder is None else vision_encoder
            feats = encode(pixel_values).reshape(-1, cfg.text.hidden_size)
        else:
            feats = jnp.zeros((0, cfg.text.hidden_size), self.dtype)
        rows, cols = np.nonzero(is_vision)  # row-major = order of appearance, as HF's masked_scatter
        hidden = _embed_tokens(self.language_model, jnp.asarray(ids_np), feats, rows, cols)
        # Positions count real tokens only, so left padding does not shift them (HF generate's rule).
        position_ids = np.where(valid, np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
        modality = np.where(valid, np.where(is_vision, VISION, TEXT), PAD).astype(np.int32)
        return Embedded(hidden, jnp.asarray(position_ids), jnp.asarray(modality))

    def rope(self, position_ids: Array) -> tuple[Array, Array]:
        """``(cos, sin)`` each ``(B, N, head_dim)`` for 1-D ``position_ids (B, N)``."""
        return self.language_model.rope(position_ids)

    @staticmethod
    def attention_mask(modality_mask: Array) -> Array:
        """Causal + padding mask ``(B, N, N)`` bool from the ``(B, N)`` modality mask (0 = pad)."""
        return make_attention_mask(modality_mask != PAD)

    def head(self, hidden: Array) -> Array:
        """Final RMSNorm + LM head: ``(B, N, d)`` -> logits ``(B, N, vocab)``."""
        return self.language_model.head(hidden)

    # -- whole model --------------------------------------------------------------------------

    def __call__(self, input_ids, pixel_values=None, attention_mask=None) -> Array:
        """Logits ``(B, N, vocab)`` (rows at padding positions are meaningless)."""
        emb = self.embed(input_ids, pixel_values, attention_mask)
        return decoder_forward(self.language_model, emb.hidden, emb.position_ids, emb.modality_mask)

    def generate(self, input_ids, pixel_values=None, attention_mask=None, *, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 on_token=None) -> np.ndarray:
        """Greedy decoding with a KV cache. Returns the new tokens ``(B, max_new_tokens)``;
        ``on_token(tokens (B,))`` streams each step's tokens.

        Batched prompts must be left-padded (the last column must be a real token). After a row
        emits an EOS token it is filled with ``pad_token_id`` (HF ``generate`` behaviour).
        """
        emb = self.embed(np.asarray(input_ids), pixel_values, attention_mask)
        return greedy_generate(
            emb, lambda valid: decoder_decoding(self.language_model, emb, valid, max_new_tokens),
            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            default_pad_token_id=self.config.pad_token_id, on_token=on_token)

    def num_params(self) -> int:
        return count_params(self)


@nnx.jit
def _image_features_jit(model: Llava, pixel_values):
    return model._image_features(pixel_values)


# Whole-model paths run as one compiled program each (rope, masks, all blocks, head): eager
# dispatch of the small ops would cost more than the model itself at test sizes.


@nnx.jit
def _embed_tokens(decoder: Decoder, ids, feats, rows, cols):
    """Token embeddings ``(B, N, d)`` with ``feats (K, d)`` written at ``(rows[k], cols[k])``."""
    hidden = decoder.embed(ids)
    return hidden.at[rows, cols].set(feats.astype(hidden.dtype))


def abstract_model(config: LlavaConfig, dtype=jnp.float32) -> Llava:
    """The model with ``jax.ShapeDtypeStruct`` leaves (no memory), for shapes and parameter counts."""
    return nnx.eval_shape(lambda: Llava(config, dtype=dtype, rngs=nnx.Rngs(0)))


__all__ = ["CONFIGS", "CLIPVisionConfig", "CLIPVisionTower", "Embedded", "Llava", "LlavaConfig", "PROMPT_FORMATS",
           "PooledImageConfig", "Projector", "VISION_TOWERS", "abstract_model", "dinov2_llava_config", "get_config",
           "tiny_dinov2_llava_config"]
