"""Qwen2.5-VL checkpoints (HF safetensors) -> :class:`splitq_jax.models.qwen2_5_vl.Qwen2_5_VL`.

Two key spellings are in use and both are accepted:

* hub files / ``save_pretrained``: ``model.layers.*``, ``model.embed_tokens``, ``model.norm``,
  ``visual.*``, ``lm_head``;
* transformers-5 in-memory ``state_dict()``: ``model.language_model.*``, ``model.visual.*``, ``lm_head``.

The 3B checkpoint ties the LM head to the embeddings (no ``lm_head`` tensor); 7B has its own.

Qwen2 language-model checkpoints (``Qwen2ForCausalLM``: ``model.layers.*``, ``lm_head``) load as a
*text-only* model (``config.vision is None``); text through Qwen2.5-VL's language model with equal
M-RoPE positions is exactly the Qwen2 decoder.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from splitq_jax.models.converters.hf import (ConversionError, KeyMap, KeyRule, load_state, open_checkpoint, read_config,
                           require_architecture, resolve_model_dir)
from splitq_jax.models.layers import DecoderConfig
from splitq_jax.models.qwen2_5_vl import (Qwen2_5_VL, Qwen2_5_VLConfig, VisionConfig, abstract_model,
                                          text_only_mrope_section)

# Text-only Qwen2 checkpoints become a Qwen2_5_VL without a vision tower.
TEXT_ARCHITECTURES = ("Qwen2ForCausalLM",)
ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",) + TEXT_ARCHITECTURES

# Tensors in some checkpoints that carry no weights of ours (derived buffers).
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|rotary_pos_emb\.inv_freq)$")


# --------------------------------------------------------------------------------------------
# config.json -> Qwen2_5_VLConfig
# --------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any]) -> Qwen2_5_VLConfig:
    """Our config from an HF ``config.json`` dict, old (text keys at top level, ``rope_scaling``)
    or transformers-5 layout (``text_config``, ``rope_parameters``). A ``Qwen2ForCausalLM`` config
    gives a text-only config (``vision=None``)."""
    text_only = require_architecture(hf, ARCHITECTURES) in TEXT_ARCHITECTURES
    text = dict(hf)
    text.update(hf.get("text_config") or {})  # transformers-5 nests text keys; older files keep them flat
    vis = hf.get("vision_config") or {}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    try:
        heads = text["num_attention_heads"]
        decoder = DecoderConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_layers=text["num_hidden_layers"],
            num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
            qkv_bias=True, rope_theta=float(theta), rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            hidden_act=text.get("hidden_act", "silu"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )
        vrope = vis.get("rope_parameters") or {}
        vision = None if text_only else VisionConfig(
            depth=vis["depth"], hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
            num_heads=vis["num_heads"], out_hidden_size=vis.get("out_hidden_size", decoder.hidden_size),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2), window_size=vis.get("window_size", 112),
            fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
            tokens_per_second=vis.get("tokens_per_second", 2), hidden_act=vis.get("hidden_act", "silu"),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        eos = text.get("eos_token_id", hf.get("eos_token_id"))
        return Qwen2_5_VLConfig(
            text=decoder, vision=vision,
            mrope_section=tuple(rope.get("mrope_section") or (
                text_only_mrope_section(decoder.resolved_head_dim) if text_only else (16, 24, 24))),
            image_token_id=hf.get("image_token_id", 151655), video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            bos_token_id=text.get("bos_token_id"),
            eos_token_id=tuple(np.atleast_1d(eos).tolist()) if eos is not None else (),
            pad_token_id=text.get("pad_token_id"),
            hf_id=hf.get("_name_or_path") or None,
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}; it is not a complete Qwen2.5-VL config, "
                              f"re-download config.json") from e
    except ValueError as e:
        raise ConversionError(f"config.json is inconsistent: {e}") from e


# --------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------

_LINEAR = r"(?P<m>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv|proj)"
_PARAM = {"weight": "w", "bias": "b"}
# Both spellings onto lm.* / vis.* / lm_head.*, then one rule per kind of tensor.
_KEYS = KeyMap(
    prefixes=[("model.language_model.", "lm."), ("model.visual.", "vis."), ("visual.", "vis."), ("model.", "lm."),
              ("lm_head.", "lm_head.")],
    rules=[
        KeyRule(r"lm\.embed_tokens\.weight", ("language_model", "embed_tokens", "weight")),
        KeyRule(r"lm\.norm\.weight", ("language_model", "norm", "scale")),
        KeyRule(r"lm_head\.weight", ("language_model", "lm_head", "w")),
        KeyRule(r"lm\.layers\.(?P<i>\d+)\.(?P<n>input_layernorm|post_attention_layernorm)\.weight",
                ("language_model", "layers", "{i}", "{n}", "scale")),
        KeyRule(r"lm\.layers\.(?P<i>\d+)\.(?P<s>self_attn|mlp)\." + _LINEAR + r"\.(?P<p>weight|bias)",
                ("language_model", "layers", "{i}", "{s}", "{m}", "{p}"), _PARAM),
        KeyRule(r"vis\.patch_embed\.proj\.weight", ("visual", "patch_embed", "w"), transform="flatten_patch"),
        KeyRule(r"vis\.blocks\.(?P<i>\d+)\.(?P<n>norm1|norm2)\.weight", ("visual", "blocks", "{i}", "{n}", "scale")),
        KeyRule(r"vis\.blocks\.(?P<i>\d+)\.(?P<s>attn|mlp)\." + _LINEAR + r"\.(?P<p>weight|bias)",
                ("visual", "blocks", "{i}", "{s}", "{m}", "{p}"), _PARAM),
        KeyRule(r"vis\.merger\.ln_q\.weight", ("visual", "merger", "ln_q", "scale")),
        # nn.Sequential(Linear, GELU, Linear): indices 0 and 2
        KeyRule(r"vis\.merger\.mlp\.0\.(?P<p>weight|bias)", ("visual", "merger", "fc1", "{p}"), _PARAM),
        KeyRule(r"vis\.merger\.mlp\.2\.(?P<p>weight|bias)", ("visual", "merger", "fc2", "{p}"), _PARAM),
    ],
)
_TRANSFORMS = {"flatten_patch": lambda arr: arr.reshape(arr.shape[0], -1)}  # Conv3d (out, C, T, P, P) -> linear


def map_key(key: str) -> tuple[tuple, str | None] | None:
    """Target path in the NNX state (ints for list indices) and transform name for one HF key,
    or None when the key is not a Qwen2.5-VL weight."""
    return _KEYS(key)


# What ``save_pretrained`` of transformers 5 writes (the hub files' spelling), for exports.
EXPORT_SPELLING = (("lm_head.", "lm_head."), ("lm.", "model."), ("vis.", "visual."))
# Modules an export keeps in floating point, as compressed-tensors ``ignore`` entries; ``re:``
# patterns match the module names of either spelling (``visual.*`` or ``model.visual.*``).
EXPORT_IGNORE = ("lm_head", "re:.*visual\\..*")


def key_for(path: tuple) -> tuple[str, str | None]:
    """The HF key (:data:`EXPORT_SPELLING`) of one of our parameter paths, and the transform the
    tensor went through on loading (undo it with :func:`unload_transform`)."""
    return _KEYS.key_for(path, EXPORT_SPELLING)


def unload_transform(name: str | None, arr: np.ndarray, config: Qwen2_5_VLConfig) -> np.ndarray:
    """Undo a loading transform: the patch embedding back to Conv3d's ``(out, C, T, P, P)``."""
    if name is None:
        return arr
    if name == "flatten_patch":
        v = config.vision
        return arr.reshape(arr.shape[0], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    raise ValueError(f"unknown transform {name!r}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_qwen2_5_vl(path_or_id: str | os.PathLike, dtype=jnp.float32) -> tuple[Qwen2_5_VL, Qwen2_5_VLConfig]:
    """Build a :class:`Qwen2_5_VL` from an HF checkpoint directory or hub id.

    Parameters are created directly from the checkpoint (no random init), tensor by tensor, cast
    to ``dtype``. Every model parameter must be found exactly once and with the right shape.
    """
    model_dir = resolve_model_dir(path_or_id)
    config = config_from_hf(read_config(model_dir))
    if not os.path.exists(os.path.expanduser(str(path_or_id))):  # fetched by hub id
        config = dataclasses.replace(config, hf_id=str(path_or_id))
    # a tied checkpoint may still store a copy of the embeddings as lm_head
    tied = [("language_model", "lm_head", "w")] if config.text.tie_word_embeddings else []
    model = load_state(abstract_model(config, dtype), open_checkpoint(model_dir), _KEYS, family="Qwen2.5-VL",
                       transforms=_TRANSFORMS, ignored=_IGNORED, tolerated=tied)
    return model, config
