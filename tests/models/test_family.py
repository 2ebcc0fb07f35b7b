"""The model-family registry (splitq_jax.models.family)."""

from __future__ import annotations

import importlib

import pytest

from splitq_jax.errors import SplitqError
from splitq_jax.models import llava, qwen2_5_vl
from splitq_jax.models.family import CHECKPOINT_FAMILIES, FAMILIES, UnknownFamilyError, family_of, get_family


def test_unknown_family_names_the_known_ones():
    with pytest.raises(UnknownFamilyError, match=r"unknown model family 'nope'; known: llava, llava_dinov2, qwen2_5_vl"):
        get_family("nope")
    # a user-fixable error that older callers catch as ValueError
    assert issubclass(UnknownFamilyError, SplitqError) and issubclass(UnknownFamilyError, ValueError)
    with pytest.raises(UnknownFamilyError):
        family_of("nope", llava.get_config("llava-1.5-tiny"))


def test_variant_comes_from_the_config():
    assert family_of("llava", llava.get_config("llava-1.5-tiny")).name == "llava"
    dino = family_of("llava", llava.get_config("llava-dinov2-tiny"))
    assert dino.name == "llava_dinov2" and dino.vision_tower == "dinov2" and dino.checkpoint_name == "llava"
    qwen = family_of("qwen2_5_vl", qwen2_5_vl.get_config("qwen2.5-vl-tiny"))
    assert qwen is get_family("qwen2_5_vl") and qwen.rope == "mrope" and qwen.takes_grid
    assert family_of(dino) is dino  # a Family passes through
    assert CHECKPOINT_FAMILIES == ("qwen2_5_vl", "llava")


def test_model_args_follow_each_family_signature():
    batch = {"input_ids": "ids", "pixel_values": "pix", "image_grid_thw": "grid", "attention_mask": "mask"}
    assert get_family("qwen2_5_vl").model_args(batch) == ("ids", "pix", "grid", "mask")
    assert get_family("llava").model_args(batch) == ("ids", "pix", "mask")
    assert get_family("llava").model_args({"input_ids": "ids"}, with_grid=True) == ("ids", None, None, None)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_entry_points_at_real_code(name):
    """Module, converter and image config of each entry exist (a typo would fail only at use)."""
    from splitq_jax import preprocess as pp

    fam = get_family(name)
    module = importlib.import_module(fam.module)
    assert hasattr(module, "get_config") and hasattr(module, "abstract_model")
    conv_module, _, conv_name = fam.converter.partition(":")
    assert callable(getattr(importlib.import_module(conv_module), conv_name))
    assert isinstance(getattr(pp, fam.image_config), type)
    assert fam.rope in ("mrope", "1d") and fam.image_input in ("patches_grid", "pixels")
    config = (qwen2_5_vl.get_config("qwen2.5-vl-tiny") if name == "qwen2_5_vl"
              else llava.get_config("llava-dinov2-tiny" if name == "llava_dinov2" else "llava-1.5-tiny"))
    assert all(isinstance(getattr(config, a), int) for a in fam.special_token_attrs)
    assert family_of(fam.checkpoint_name, config) is fam
    model = module.abstract_model(config)
    assert len(fam.vision_blocks(model)) > 0
