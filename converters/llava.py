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

import jax
import jax.numpy as jnp
from flax import nnx

from converters.hf import ConversionError, open_checkpoint, read_config, require_architecture, resolve_model_dir
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

# (pattern on the normalised key, target path template, which parameter-name table to apply)
_RULES: list[tuple[re.Pattern, tuple, dict | None]] = [
    (re.compile(r"lm\.embed_tokens\.weight"), ("language_model", "embed_tokens", "weight"), None),
    (re.compile(r"lm\.norm\.(?P<p>weight)"), ("language_model", "norm", "{p}"), _NORM_PARAM),
    (re.compile(r"lm_head\.(?P<p>weight)"), ("language_model", "lm_head", "{p}"), _PARAM),
    (re.compile(r"lm\.layers\.(?P<i>\d+)\.(?P<n>input_layernorm|post_attention_layernorm)\.(?P<p>weight)"),
     ("language_model", "layers", "{i}", "{n}", "{p}"), _NORM_PARAM),
    (re.compile(r"lm\.layers\.(?P<i>\d+)\.(?P<s>self_attn|mlp)\."
                r"(?P<m>q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.(?P<p>weight|bias)"),
     ("language_model", "layers", "{i}", "{s}", "{m}", "{p}"), _PARAM),
    (re.compile(r"vis\.embeddings\.class_embedding"), ("vision_tower", "class_embedding"), None),
    (re.compile(r"vis\.embeddings\.patch_embedding\.weight"), ("vision_tower", "patch_embedding"), None),
    (re.compile(r"vis\.embeddings\.position_embedding\.weight"), ("vision_tower", "position_embedding"), None),
    (re.compile(r"vis\.(?P<n>pre_layrnorm|post_layernorm)\.(?P<p>weight|bias)"),
     ("vision_tower", "{n}", "{p}"), _NORM_PARAM),
    (re.compile(r"vis\.encoder\.layers\.(?P<i>\d+)\.(?P<n>layer_norm1|layer_norm2)\.(?P<p>weight|bias)"),
     ("vision_tower", "layers", "{i}", "{n}", "{p}"), _NORM_PARAM),
    (re.compile(r"vis\.encoder\.layers\.(?P<i>\d+)\.(?P<s>self_attn|mlp)\."
                r"(?P<m>q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.(?P<p>weight|bias)"),
     ("vision_tower", "layers", "{i}", "{s}", "{m}", "{p}"), _PARAM),
    (re.compile(r"proj\.(?P<m>linear_1|linear_2)\.(?P<p>weight|bias)"),
     ("multi_modal_projector", "{m}", "{p}"), _PARAM),
]


def _normalise(key: str) -> str | None:
    """One spelling for all checkpoints; None for keys that are no LLaVA weight."""
    if key.startswith("model.") and not key.startswith("model.layers."):
        key = key[len("model."):]  # transformers-5 in-memory wrapper
    for prefix, repl in _PREFIXES:
        if key.startswith(prefix):
            return repl + key[len(prefix):]
    return None


def map_key(key: str) -> tuple | None:
    """Target path in the NNX state (ints for list indices) for one HF key, or None."""
    norm = _normalise(key)
    if norm is None:
        return None
    for pattern, template, table in _RULES:
        m = pattern.fullmatch(norm)
        if not m:
            continue
        groups = m.groupdict()
        path = []
        for part in template:
            if part == "{p}":
                path.append(table[groups["p"]])
                continue
            part = part.format(**groups)
            path.append(int(part) if part.isdigit() else part)
        return tuple(path)
    return None


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
    ckpt = open_checkpoint(model_dir)

    graphdef, state = nnx.split(abstract_model(config, dtype))
    expected = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    found: dict[tuple, jax.Array] = {}
    sources: dict[tuple, str] = {}
    unexpected = []
    for key in ckpt.keys():  # noqa: SIM118 (a checkpoint view, not a dict)
        path = map_key(key)
        if path is None:
            if not _IGNORED.fullmatch(key):
                unexpected.append(key)
            continue
        if path not in expected:
            if path == ("language_model", "lm_head", "w") and config.text.tie_word_embeddings:
                continue  # a tied checkpoint may still store a copy of the embeddings
            unexpected.append(key)
            continue
        if path in sources:
            raise ConversionError(f"{key!r} and {sources[path]!r} both map to {'.'.join(map(str, path))}; "
                                  f"the checkpoint mixes two key spellings, keep one")
        want, got = tuple(expected[path].shape), tuple(ckpt.shape(key))
        if got != want:
            raise ConversionError(f"{key!r} has shape {got} but the model expects {want}; "
                                  f"config.json does not describe these weights")
        found[path] = jnp.asarray(ckpt.get(key).astype(dtype))  # one tensor in host memory at a time
        sources[path] = key
    if unexpected:
        raise ConversionError(f"{len(unexpected)} checkpoint tensors are not LLaVA weights "
                              f"(first: {unexpected[:3]}); is this the right checkpoint for this converter?")
    missing = [".".join(map(str, p)) for p in expected if p not in found]
    if missing:
        raise ConversionError(f"{len(missing)} model parameters are missing from the checkpoint "
                              f"(first: {missing[:3]}); the checkpoint is incomplete, re-download it")

    pure: dict = {}
    for path, value in found.items():
        node = pure
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), config


__all__ = ["ARCHITECTURES", "config_from_hf", "load_llava", "map_key"]
