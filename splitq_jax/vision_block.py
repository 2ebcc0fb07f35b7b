"""Vision-tower blocks as calibration units (paper A.4: SplitQ on the visual encoder).

Each config here implements the block *architecture protocol* of :mod:`splitq_jax.block`
(``groups``, ``group_norm``, ``norm_keys``, ``forward``), so :mod:`splitq_jax.calibrate`,
:mod:`splitq_jax.quantized.fold` and the runtime treat a vision block exactly like a decoder block:

* :class:`QwenVisionBlockConfig` -- Qwen2.5-VL's ViT block: RMSNorm, one fused biased ``qkv``
  projection, 2-D rotary, windowed or full attention (the mask is an input), biased ``proj``,
  RMSNorm, biased SwiGLU. Groups ``attn_in`` (qkv), ``attn_out`` (proj), ``mlp_in`` (gate, up),
  ``mlp_out`` (down).
* :class:`ClipBlockConfig` -- LLaVA's CLIP block: LayerNorm, biased q/k/v, full attention without
  rotary, biased ``out_proj``, LayerNorm, ``fc2(quick_gelu(fc1(x)))``.
* :class:`Dinov2BlockConfig` -- the DINOv2 block of LLaVA's DINOv2 variant: as CLIP's with GELU and
  LayerScale, the LayerScales folded into ``o_proj`` / ``fc2``.

Block parameters use the modules' own names (``norm1``, ``qkv``, ... / ``layer_norm1``, ``q_proj``,
...); :func:`block_params` reads them from the NNX blocks.

A vision tower only sees vision tokens, so the text side of SplitQ has nothing to act on:
:func:`splitq_jax.calib.vision.vision_method_config` sets the text-outlier group to size 0 and turns MAC (a text-token
branch) off. With ``k_t = 0`` MOCD reduces to Eq. 8 -- the ``vision_ratio`` channels with the largest
vision-token magnitude form the outlier group -- and CWS, the transforms and clipping are unchanged.
This is the toolkit's reading of A.4, which gives no details [choice].

Calibration samples are images (:mod:`splitq_jax.calib.vision`): one image per row of the stream,
its patches padded to the longest image (padding never attends to or from real patches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from splitq_jax.models import layers
from splitq_jax.models.family import FAMILIES, Family, UnknownFamilyError, family_of, get_family

Tree = dict[str, Any]

QWEN_VISION_GROUPS = {"attn_in": ("qkv",), "attn_out": ("proj",), "mlp_in": ("gate_proj", "up_proj"),
                      "mlp_out": ("down_proj",)}
CLIP_GROUPS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "attn_out": ("out_proj",), "mlp_in": ("fc1",),
               "mlp_out": ("fc2",)}


def _no_cache(cache) -> None:
    if cache is not None:
        raise ValueError("vision blocks attend over a whole image at once: they take no KV cache")


def _runner(linear, capture):
    def run(group: str, inp: jax.Array) -> dict[str, jax.Array]:
        if capture is not None:
            capture[group] = inp
        return linear(group, inp)

    return run


@dataclass(frozen=True, kw_only=True)
class QwenVisionBlockConfig:
    """One Qwen2.5-VL vision block. ``cos, sin: (B, N, head_dim)`` 2-D rotary; ``mask: (B, N, N)``."""

    hidden: int
    intermediate: int
    num_heads: int
    rms_eps: float = 1e-6
    act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        return QWEN_VISION_GROUPS

    @property
    def group_norm(self) -> dict[str, str]:
        return {"attn_in": "norm1", "mlp_in": "norm2"}

    @property
    def norm_keys(self) -> tuple[str, ...]:
        return ("norm1", "norm2")

    def forward(self, norms, linear, x, cos, sin, mask, *, capture=None, cache=None) -> jax.Array:
        _no_cache(cache)
        run = _runner(linear, capture)
        b, n, _ = x.shape
        h = layers.rms_norm(x, norms["norm1"]["scale"], self.rms_eps)
        qkv = run("attn_in", h)["qkv"].reshape(b, n, 3, self.num_heads, self.head_dim)
        # Rotation in float32, as the module does.
        q, k = (layers.apply_rope(qkv[:, :, i].astype(jnp.float32), cos, sin).astype(x.dtype) for i in (0, 1))
        a = layers.dot_product_attention(q, k, qkv[:, :, 2], mask, self.head_dim ** -0.5)
        x = x + run("attn_out", a.reshape(b, n, -1))["proj"]
        h = layers.rms_norm(x, norms["norm2"]["scale"], self.rms_eps)
        gu = run("mlp_in", h)
        m = layers.get_activation(self.act)(gu["gate_proj"]) * gu["up_proj"]
        return x + run("mlp_out", m)["down_proj"]


@dataclass(frozen=True, kw_only=True)
class ClipBlockConfig:
    """One CLIP encoder layer. No rotary (``cos``/``sin`` are ignored); ``mask: (B, N, N)`` or None."""

    hidden: int
    intermediate: int
    num_heads: int
    ln_eps: float = 1e-5
    act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        return CLIP_GROUPS

    @property
    def group_norm(self) -> dict[str, str]:
        return {"attn_in": "layer_norm1", "mlp_in": "layer_norm2"}

    @property
    def norm_keys(self) -> tuple[str, ...]:
        return ("layer_norm1", "layer_norm2")

    def forward(self, norms, linear, x, cos, sin, mask, *, capture=None, cache=None) -> jax.Array:
        del cos, sin
        _no_cache(cache)
        run = _runner(linear, capture)
        b, n, _ = x.shape
        heads = lambda y: y.reshape(b, n, self.num_heads, self.head_dim)  # noqa: E731
        ln1, ln2 = norms["layer_norm1"], norms["layer_norm2"]
        qkv = run("attn_in", layers.layer_norm(x, ln1["scale"], ln1["bias"], self.ln_eps))
        a = layers.dot_product_attention(heads(qkv["q_proj"]), heads(qkv["k_proj"]), heads(qkv["v_proj"]),
                                         mask, self.head_dim ** -0.5)
        x = x + run("attn_out", a.reshape(b, n, -1))["out_proj"]
        h = run("mlp_in", layers.layer_norm(x, ln2["scale"], ln2["bias"], self.ln_eps))["fc1"]
        return x + run("mlp_out", layers.get_activation(self.act)(h))["fc2"]


@dataclass(frozen=True, kw_only=True)
class Dinov2BlockConfig:
    """One DINOv2 block (LLaVA's DINOv2 variant): LayerNorm, biased q/k/v, full attention without
    rotary, biased ``o_proj``, LayerNorm, ``fc2(gelu(fc1(x)))``. The LayerScales are folded into
    ``o_proj`` / ``fc2`` (:func:`block_params`), so the block keeps only its two norms besides the
    linears. ``cos``/``sin``/``mask`` are ignored (one image per row, no padding)."""

    hidden: int
    intermediate: int
    num_heads: int
    ln_eps: float = 1e-6
    act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        from splitq_jax.models.dinov2 import VIT_GROUPS

        return VIT_GROUPS

    @property
    def group_norm(self) -> dict[str, str]:
        from splitq_jax.models.dinov2 import VIT_GROUP_NORM

        return VIT_GROUP_NORM

    @property
    def norm_keys(self) -> tuple[str, ...]:
        return ("norm1", "norm2")

    def forward(self, norms, linear, x, cos, sin, mask, *, capture=None, cache=None) -> jax.Array:
        from splitq_jax.models.dinov2 import Dinov2Config, vit_block_forward

        del cos, sin, mask
        _no_cache(cache)
        cfg = Dinov2Config(hidden_size=self.hidden, intermediate_size=self.intermediate, num_layers=1,
                           num_heads=self.num_heads, layer_norm_eps=self.ln_eps, hidden_act=self.act)
        one = jnp.ones((), x.dtype)
        params = {"norm1": norms["norm1"], "norm2": norms["norm2"], "layer_scale1": one, "layer_scale2": one}
        return vit_block_forward(params, linear, x, cfg, capture=capture)


VisionBlockConfig = QwenVisionBlockConfig | ClipBlockConfig | Dinov2BlockConfig


# ---------------------------------------------------------------------------------------------
# Models -> block configs, parameters


def _tower(family, model_config=None) -> Family:
    """The family (refined by ``model_config`` when given) whose vision tower is meant."""
    try:
        fam = get_family(family) if isinstance(family, str) else family
    except UnknownFamilyError:
        raise UnknownFamilyError(f"no vision tower to quantize for model family {family!r}; "
                                 f"known: {', '.join(sorted(FAMILIES))}") from None
    return fam if model_config is None else family_of(fam, model_config)


def _vision_config(model_config):
    if model_config.vision is None:
        raise ValueError("this model has no vision tower; run without --quantize-vision")
    return model_config.vision


# Per vision-tower kind (models.family.Family.vision_tower): its block config from the tower config.
_BLOCK_CONFIGS = {
    "qwen_vit": lambda v: QwenVisionBlockConfig(hidden=v.hidden_size, intermediate=v.intermediate_size,
                                                num_heads=v.num_heads, rms_eps=v.rms_norm_eps, act=v.hidden_act),
    "clip": lambda v: ClipBlockConfig(hidden=v.hidden_size, intermediate=v.intermediate_size, num_heads=v.num_heads,
                                      ln_eps=v.layer_norm_eps, act=v.hidden_act),
    "dinov2": lambda v: Dinov2BlockConfig(hidden=v.hidden_size, intermediate=v.intermediate_size,
                                          num_heads=v.num_heads, ln_eps=v.layer_norm_eps, act=v.hidden_act),
}


def block_config(model, family: str) -> VisionBlockConfig:
    """The vision block architecture of a loaded model."""
    fam = _tower(family)  # an unknown name fails before the model is looked at
    return _BLOCK_CONFIGS[_tower(fam, model.config).vision_tower](_vision_config(model.config))


def _linear(m) -> Tree:
    return m.params()


def _qwen_block_params(block) -> Tree:
    return {"norm1": {"scale": block.norm1.scale[...]}, "qkv": _linear(block.attn.qkv),
            "proj": _linear(block.attn.proj), "norm2": {"scale": block.norm2.scale[...]},
            "gate_proj": _linear(block.mlp.gate_proj), "up_proj": _linear(block.mlp.up_proj),
            "down_proj": _linear(block.mlp.down_proj)}


def _clip_block_params(block) -> Tree:
    ln = lambda m: {"scale": m.scale[...], "bias": m.bias[...]}  # noqa: E731
    a = block.self_attn
    return {"layer_norm1": ln(block.layer_norm1), "q_proj": _linear(a.q_proj), "k_proj": _linear(a.k_proj),
            "v_proj": _linear(a.v_proj), "out_proj": _linear(a.out_proj), "layer_norm2": ln(block.layer_norm2),
            "fc1": _linear(block.mlp.fc1), "fc2": _linear(block.mlp.fc2)}


def _dinov2_block_params(block) -> Tree:
    params = block.block_params(fold_layer_scale=True)  # LayerScale folded in
    return {k: params[k] for k in ("norm1", "q_proj", "k_proj", "v_proj", "o_proj", "norm2", "fc1", "fc2")}


_BLOCK_PARAMS = {"qwen_vit": _qwen_block_params, "clip": _clip_block_params, "dinov2": _dinov2_block_params}


def block_params(block, family: str) -> Tree:
    """A vision block's weights as the plain dict its config's ``forward`` reads."""
    kind = _tower(family).vision_tower
    if kind == "clip" and hasattr(block, "layer_scale1"):
        kind = "dinov2"  # no model config here: the block itself tells LLaVA's DINOv2 variant apart
    return _BLOCK_PARAMS[kind](block)


def num_quantized_blocks(model_config, family: str) -> int:
    """How many vision blocks quantization covers: every Qwen2.5-VL block; for LLaVA the tower's
    layers up to the deepest feature layer (later layers never reach the language model)."""
    fam = _tower(family)
    v = _vision_config(model_config)
    if family_of(fam, model_config).vision_tower == "qwen_vit":
        return v.depth
    return model_config.used_vision_layers


def quantized_blocks(model, family: str) -> list:
    """The NNX vision blocks that quantization covers (see :func:`num_quantized_blocks`)."""
    n = num_quantized_blocks(model.config, family)
    return _tower(family, model.config).vision_blocks(model)[:n]


__all__ = ["ClipBlockConfig", "Dinov2BlockConfig", "QwenVisionBlockConfig", "block_config", "block_params",
           "quantized_blocks"]
