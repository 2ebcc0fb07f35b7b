"""The one whole-model forward: a family's embedding, rotary tables and mask, a stack of blocks,
the head. What runs the blocks is an argument, so the full-precision model, the quantized runtime
and (later) gradient passes share everything around them.

    inp = prepare(model, "qwen2_5_vl", batch)                 # embeddings, cos/sin, mask, modality
    y = logits(model, "qwen2_5_vl", batch)                    # fp decoder layers
    y = logits(model, "qwen2_5_vl", batch, blocks=qm.run_blocks, vision_encoder=qm.vision_features)

A batch is a dict of arrays: ``input_ids (B, N)``, ``attention_mask (B, N)``, ``pixel_values``
(Qwen2.5-VL: ``(patches, C*T*P*P)`` with ``image_grid_thw (n, 3)``; LLaVA: ``(n, 3, S, S)``) and
optionally ``modality (B, N)`` (codes 0 pad, 1 text, 2 vision, 3 answer), which replaces the
model's own codes so that answer tokens keep theirs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from splitq_jax.modality import PAD, VISION
from splitq_jax.models.family import family_of

Array = jax.Array
# (x (B, N, d), cos, sin (B, N, hd), mask (B, N, N) bool, modality (B, N)) -> (B, N, d)
Blocks = Callable[[Array, Array, Array, Array, Array], Array]


class Inputs(NamedTuple):
    """What the first block reads. hidden: ``(B, N, d)``; cos, sin: ``(B, N, hd)``; mask:
    ``(B, N, N)`` bool; modality: ``(B, N)`` int32; position_ids: the family's positions."""

    hidden: Array
    cos: Array
    sin: Array
    mask: Array
    modality: Array
    position_ids: Array


def checked_modality(own: Array, given: Any) -> Array:
    """The batch's ``modality`` codes in place of the model's ``own`` ones, after checking that
    they agree on padding and on image placeholders (only text codes may differ: answer tokens)."""
    if given is None:
        return own
    given = jnp.asarray(given, jnp.int32)
    if given.shape != own.shape or bool(jnp.any((given == PAD) != (own == PAD))) or bool(
            jnp.any((given == VISION) != (own == VISION))):
        raise ValueError("the batch's modality codes disagree with the model's padding or image placeholders")
    return given


def prepare(model, family: str, batch: Mapping[str, Any], *, vision_encoder: Callable | None = None) -> Inputs:
    """Embed ``batch`` with the family's model (``vision_encoder`` replaces its vision tower, e.g.
    the quantized one) and build the rotary tables, attention mask and modality codes."""
    emb = model.embed(*family_of(family, model.config).model_args(batch), vision_encoder=vision_encoder)
    modality = checked_modality(emb.modality_mask, batch.get("modality"))
    cos, sin = model.rope(emb.position_ids)
    return Inputs(emb.hidden, cos, sin, model.attention_mask(modality), modality, emb.position_ids)


@nnx.jit
def _fp_layers(decoder, x, cos, sin, mask):
    return decoder(x, cos, sin, mask)


def fp_blocks(model) -> Blocks:
    """The model's own full-precision decoder layers as a :data:`Blocks` runner."""
    return lambda x, cos, sin, mask, modality: _fp_layers(model.language_model, x, cos, sin, mask)


def logits(model, family: str, batch: Mapping[str, Any], *, blocks: Blocks | None = None,
           vision_encoder: Callable | None = None) -> Array:
    """Logits ``(B, N, vocab)``: :func:`prepare`, then ``blocks`` (default :func:`fp_blocks`),
    then the model's final norm and head. Rows at padding positions are meaningless."""
    inp = prepare(model, family, batch, vision_encoder=vision_encoder)
    run = fp_blocks(model) if blocks is None else blocks
    return model.head(run(inp.hidden, inp.cos, inp.sin, inp.mask, inp.modality))


__all__ = ["Blocks", "Inputs", "checked_modality", "fp_blocks", "logits", "prepare"]
