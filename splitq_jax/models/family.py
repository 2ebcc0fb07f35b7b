"""The model families, as data: what differs between Qwen2.5-VL, LLaVA-1.5 and LLaVA with DINOv2.

Code that must treat the families differently looks the difference up here instead of testing
the family's name, so that the facts about a family live in one place::

    fam = family_of("llava", model.config)     # the DINOv2 variant when the config says so
    if fam.takes_grid: ...                      # Qwen's (patches, image_grid_thw) image input

A *family name* is what manifests, ``load_model`` and the CLIs pass around: ``"qwen2_5_vl"`` or
``"llava"``. The DINOv2 variant (``easyvqa-vlm-0.5b``) is a LLaVA model (same module, same
checkpoint family) whose config says ``vision_tower="dinov2"``; :func:`family_of` resolves it, and
``get_family("llava_dinov2")`` names it directly.

Every family's decoder is a Qwen2/Llama block stack (:class:`splitq_jax.models.layers.Decoder`)
with a causal + padding attention mask built from the ``(B, N)`` modality mask, a final RMSNorm and
an LM head (tied or not, from the config); those are common and not recorded per family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from splitq_jax.errors import SplitqError


class UnknownFamilyError(SplitqError):
    """A model family name this version does not know."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """What one model family does its own way."""

    name: str
    # The family name manifests and load_model use (the DINOv2 variant is saved as "llava").
    checkpoint_name: str
    # The module with the model class, ``get_config`` and ``abstract_model``.
    module: str
    # The transformers class of the reference model (``--check``), and the HF-checkpoint loader
    # (``module:function`` returning ``(model, config)``) of models.converters.
    hf_class: str
    converter: str
    # How image features enter: "patches_grid" -- ``pixel_values (patches, C*T*P*P)`` plus
    # ``image_grid_thw (n, 3)``, merged tokens scattered into the placeholders (Qwen2.5-VL);
    # "pixels" -- ``pixel_values (n, 3, S, S)``, a fixed number of projected tokens per image.
    image_input: str
    # Rotary positions: "mrope" (``(3, B, N)`` positions, ``mrope_section`` splits the frequencies)
    # or "1d" (``(B, N)`` positions counting real tokens).
    rope: str
    # Chat template: "qwen" or "llava"; None: from the model config's ``prompt_format`` (or the
    # tokenizer) -- a LLaVA-family model may use either.
    prompt_format: str | None
    # The preprocess.* image config class the family's images are prepared with.
    image_config: str
    # Config attributes holding special token ids that are not plain text.
    special_token_attrs: tuple[str, ...]
    # The vision tower: "qwen_vit" (window attention ViT + patch merger), "clip" or "dinov2".
    vision_tower: str
    # Where the tower and its blocks live on the model: ``getattr(getattr(model, vision_attr), blocks_attr)``.
    vision_attr: str
    vision_blocks_attr: str
    # The model config class and its vision part, as ``module:name`` (rebuilt from a manifest).
    config_class: str
    vision_config_class: str
    # ``config.vision_tower`` value -> the registry name of the variant it selects.
    variants: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def resolve(ref: str) -> Any:
        """The object a ``module:name`` reference names (imported on use: no model module is
        imported before a family is needed)."""
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)

    def abstract_model(self, config, dtype=None):
        """The family's abstract NNX model of ``config`` (its module's ``abstract_model``)."""
        fn = getattr(importlib.import_module(self.module), "abstract_model")
        return fn(config) if dtype is None else fn(config, dtype)

    @property
    def takes_grid(self) -> bool:
        """Whether forward/generate/embed take ``image_grid_thw`` after ``pixel_values``."""
        return self.image_input == "patches_grid"

    def vision_blocks(self, model) -> list:
        """The model's vision blocks (NNX modules), in order."""
        return list(getattr(getattr(model, self.vision_attr), self.vision_blocks_attr))

    def model_args(self, batch, *, with_grid: bool | None = None) -> tuple:
        """The positional arguments of the family model's ``__call__`` / ``generate`` for a batch dict:
        ``(input_ids, pixel_values[, image_grid_thw], attention_mask)``."""
        grid = self.takes_grid if with_grid is None else with_grid
        pix = (batch.get("pixel_values"), batch.get("image_grid_thw")) if grid else (batch.get("pixel_values"),)
        return (batch["input_ids"], *pix, batch.get("attention_mask"))


_LLAVA_COMMON = dict(checkpoint_name="llava", module="splitq_jax.models.llava",
                     hf_class="LlavaForConditionalGeneration",
                     converter="splitq_jax.models.converters.llava:load_llava", image_input="pixels", rope="1d",
                     image_config="LlavaImageConfig", special_token_attrs=("image_token_id",),
                     vision_attr="vision_tower", vision_blocks_attr="layers",
                     config_class="splitq_jax.models.llava:LlavaConfig")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(name="qwen2_5_vl", checkpoint_name="qwen2_5_vl", module="splitq_jax.models.qwen2_5_vl",
           hf_class="Qwen2_5_VLForConditionalGeneration",
           converter="splitq_jax.models.converters.qwen2_5_vl:load_qwen2_5_vl", image_input="patches_grid", rope="mrope",
           prompt_format="qwen", image_config="QwenImageConfig",
           special_token_attrs=("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
           vision_tower="qwen_vit", vision_attr="visual", vision_blocks_attr="blocks",
           config_class="splitq_jax.models.qwen2_5_vl:Qwen2_5_VLConfig",
           vision_config_class="splitq_jax.models.qwen2_5_vl:VisionConfig"),
    Family(name="llava", prompt_format=None, vision_tower="clip", variants=(("dinov2", "llava_dinov2"),),
           vision_config_class="splitq_jax.models.llava:CLIPVisionConfig", **_LLAVA_COMMON),
    # easyvqa-vlm-0.5b: DINOv2 tower, Qwen2 decoder, Qwen chat prompts with <|image_pad|> placeholders.
    Family(name="llava_dinov2", prompt_format=None, vision_tower="dinov2",
           vision_config_class="splitq_jax.models.dinov2:Dinov2Config", **_LLAVA_COMMON),
)}

# The family names a checkpoint or a model loader may carry.
CHECKPOINT_FAMILIES = tuple(dict.fromkeys(f.checkpoint_name for f in FAMILIES.values()))


def get_family(name: str) -> Family:
    """The registered family called ``name``; :class:`UnknownFamilyError` (a ``SplitqError``, so a ``ValueError``) otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UnknownFamilyError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def family_of(name: str | Family, model_config=None) -> Family:
    """The family of a model: ``name`` (a family name or a :class:`Family`), refined to the variant
    its ``model_config`` selects (a LLaVA config with ``vision_tower="dinov2"``)."""
    fam = name if isinstance(name, Family) else get_family(name)
    tower = getattr(model_config, "vision_tower", None)
    variant = dict(fam.variants).get(tower) if isinstance(tower, str) else None
    return get_family(variant) if variant else fam


__all__ = ["CHECKPOINT_FAMILIES", "FAMILIES", "Family", "UnknownFamilyError", "family_of", "get_family"]
