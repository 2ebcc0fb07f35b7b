"""LLaVA-1.5 checkpoints (HF safetensors) -> :class:`splitq_jax.models.llava.Llava`.

Every key spelling in use is accepted (one per checkpoint):

* llava-hf hub files: ``language_model.model.*``, ``language_model.lm_head``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*``;
* transformers-5 ``save_pretrained``: the same, but ``vision_tower.*`` without ``vision_model.``;
* transformers-5 in-memory ``state_dict()``: ``model.language_model.*``, ``model.vision_tower.*``
  (with or without ``vision_model.``), ``model.multi_modal_projector.*``, ``lm_head``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp

from splitq_jax.models.converters.hf import (ConversionError, KeyMap, KeyRule, load_state, open_checkpoint, read_config,
                           require_architecture, resolve_model_dir)
from splitq_jax.models.llava import Llava, LlavaConfig, abstract_model

ARCHITECTURES = ("LlavaForConditionalGeneration",)

# Derived buffers some checkpoints carry; they hold no weights of ours.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def config_from_hf(hf: dict[str, Any]) -> LlavaConfig:
    """Our config from an HF ``config.json`` dict (old hub or transformers-5 layout)."""
    require_architecture(hf, ARCHITECTURES)
    try:
        return LlavaConfig.from_hf(hf, hf_id=hf.get("_name_or_path") or None)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"config.json does not describe a supported LLaVA model: {e}") from e


# --------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------

# Spelling prefixes, longest first, onto lm.* / lm_head.* / vis.* / proj.*
_PREFIXES = (
    ("language_model.model.", "lm."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "lm."),
    ("vision_tower.vision_model.", "vis."),
    ("vision_tower.", "vis."),
    ("multi_modal_projector.", "proj."),
    ("lm_head.", "lm_head."),
)
_PARAM = {"weight": "w", "bias": "b"}
_NORM_PARAM = {"weight": "scale", "bias": "bias"}

_KEYS = KeyMap(
    # each spelling also under the transformers-5 in-memory wrapper "model." (but model.layers.*
    # is a bare Llama's, no LLaVA weight)
    prefixes=[(pre + prefix, repl) for prefix, repl in _PREFIXES for pre in ("", "model.")],
    rules=[
        KeyRule(r"lm\.embed_tokens\.weight", ("language_model", "embed_tokens", "weight")),
        KeyRule(r"lm\.norm\.(?P<p>weight)", ("language_model", "norm", "{p}"), _NORM_PARAM),
        KeyRule(r"lm_head\.(?P<p>weight)", ("language_model", "lm_head", "{p}"), _PARAM),
        KeyRule(r"lm\.layers\.(?P<i>\d+)\.(?P<n>input_layernorm|post_attention_layernorm)\.(?P<p>weight)",
                ("language_model", "layers", "{i}", "{n}", "{p}"), _NORM_PARAM),
        KeyRule(r"lm\.layers\.(?P<i>\d+)\.(?P<s>self_attn|mlp)\."
                r"(?P<m>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(?P<p>weight|bias)",
                ("language_model", "layers", "{i}", "{s}", "{m}", "{p}"), _PARAM),
        KeyRule(r"vis\.embeddings\.class_embedding", ("vision_tower", "class_embedding")),
        KeyRule(r"vis\.embeddings\.patch_embedding\.weight", ("vision_tower", "patch_embedding")),
        KeyRule(r"vis\.embeddings\.position_embedding\.weight", ("vision_tower", "position_embedding")),
        KeyRule(r"vis\.(?P<n>pre_layrnorm|post_layernorm)\.(?P<p>weight|bias)",
                ("vision_tower", "{n}", "{p}"), _NORM_PARAM),
        KeyRule(r"vis\.encoder\.layers\.(?P<i>\d+)\.(?P<n>layer_norm1|layer_norm2)\.(?P<p>weight|bias)",
                ("vision_tower", "layers", "{i}", "{n}", "{p}"), _NORM_PARAM),
        KeyRule(r"vis\.encoder\.layers\.(?P<i>\d+)\.(?P<s>self_attn|mlp)\."
                r"(?P<m>q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.(?P<p>weight|bias)",
                ("vision_tower", "layers", "{i}", "{s}", "{m}", "{p}"), _PARAM),
        KeyRule(r"proj\.(?P<m>linear_1|linear_2)\.(?P<p>weight|bias)", ("multi_modal_projector", "{m}", "{p}"),
                _PARAM),
    ],
)


def map_key(key: str) -> tuple | None:
    """Target path in the NNX state (ints for list indices) for one HF key, or None."""
    mapped = _KEYS(key)
    return None if mapped is None else mapped[0]


# What ``save_pretrained`` of transformers 5 writes, for exports.
EXPORT_SPELLING = (("lm_head.", "language_model.lm_head."), ("lm.", "language_model.model."),
                   ("vis.", "vision_tower."), ("proj.", "multi_modal_projector."))
# Modules an export keeps in floating point (compressed-tensors ``ignore``), either spelling.
EXPORT_IGNORE = ("lm_head", "re:.*vision_tower\\..*", "re:.*multi_modal_projector\\..*")


def key_for(path: tuple) -> tuple[str, str | None]:
    """The HF key (:data:`EXPORT_SPELLING`) of one of our parameter paths, and its loading
    transform (none for LLaVA)."""
    return _KEYS.key_for(path, EXPORT_SPELLING)


def unload_transform(name: str | None, arr, config: LlavaConfig):
    """Undo a loading transform (LLaVA's tensors load as they are)."""
    if name is not None:
        raise ValueError(f"unknown transform {name!r}")
    return arr


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_llava(path_or_id: str | os.PathLike, dtype=jnp.float32) -> tuple[Llava, LlavaConfig]:
    """Build a :class:`Llava` from an HF checkpoint directory or hub id.

    Parameters are created directly from the checkpoint (no random init), tensor by tensor, cast
    to ``dtype``. Every model parameter must be found exactly once and with the right shape.
    """
    model_dir = resolve_model_dir(path_or_id)
    config = config_from_hf(read_config(model_dir))
    # a tied checkpoint may still store a copy of the embeddings as lm_head
    tied = [("language_model", "lm_head", "w")] if config.text.tie_word_embeddings else []
    model = load_state(abstract_model(config, dtype), open_checkpoint(model_dir), _KEYS, family="LLaVA",
                       ignored=_IGNORED, tolerated=tied)
    return model, config


__all__ = ["ARCHITECTURES", "EXPORT_IGNORE", "EXPORT_SPELLING", "config_from_hf", "key_for", "load_llava", "map_key",
           "unload_transform"]
