"""Inference from an exported quantized model: integer blocks between full-precision embed and head.

::

    qm = load_quantized("out/qwen2.5-vl-3b-w4a4")          # checks format and checksums
    logits = qm.logits({"input_ids": ids, "pixel_values": pix, "image_grid_thw": grid})
    tokens = qm.generate(ids, pix, grid, max_new_tokens=32, eos_token_id=qm.config.eos_token_id)

The NNX model held here is the family's module with a decoder of 0 layers: it owns the token
embedding, the vision tower (+ projector), the final norm and the head, rebuilt from the saved fp
parameters. Each decoder block is a folded tree run by :func:`splitq_jax.block.block_forward` with
:func:`splitq_jax.quantized.qlinear.quantized_group_apply` as its linear, compiled once per block shape (all
blocks of a model share one compiled program).

With a quantized vision tower (``--quantize-vision``) the module's tower has no blocks: its patch
embedding (+ rotary tables and attention segments for Qwen2.5-VL) feeds the folded vision blocks,
run the same way, and the tower's merger / LLaVA's projector finish the features.

Generation is greedy (:func:`splitq_jax.models.decode.greedy_generate`, the loop the fp models'
``generate`` use too) with a fixed-size KV cache per block (``(B, prompt + max_new_tokens, KV, hd)``
plus a write index). Activations are quantized per token, so a cached decode step computes the
same integers as recomputing the whole sequence; ``use_cache=False`` does the latter (the check).
Generated tokens carry modality code ``ANSWER`` (3): they count as text for MAC under both
``text_tokens`` choices, as answer tokens did in calibration.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from splitq_jax.quantized import export
from splitq_jax.block import BlockConfig
from splitq_jax.modality import ANSWER, PAD, VISION, text_mask
from splitq_jax.quantized.schema import InferenceSpec
from splitq_jax.quantized.export import CheckpointError
from splitq_jax.models import forward
from splitq_jax.models.family import family_of
from splitq_jax.models.decode import cache_key_valid, greedy_generate
from splitq_jax.models.layers import Decoder, KVCache, make_attention_mask
from splitq_jax.quantized.qlinear import quantized_group_apply

Tree = dict[str, Any]


def quantized_block_forward(folded: Tree, x, cos, sin, mask, modality, cfg: InferenceSpec, bcfg: BlockConfig,
                            *, cache: KVCache | None = None):
    """A folded block with integer matmuls; the signature of ``fold.folded_block_forward`` plus an
    optional KV cache (then returns ``(x, cache)``, see :func:`splitq_jax.block.block_forward`).
    ``cfg``: the checkpoint's inference spec (any config with its fields works)."""
    tmask = text_mask(modality, cfg.text_tokens)

    def linear(group: str, inp: jax.Array) -> dict[str, jax.Array]:
        return quantized_group_apply(folded["groups"][group], inp, tmask, cfg)

    return bcfg.forward(folded["norms"], linear, x, cos, sin, mask, cache=cache)


@functools.partial(jax.jit, static_argnames=("cfg", "bcfg"))
def _block(folded, x, cos, sin, mask, modality, cache, cfg, bcfg):
    return quantized_block_forward(folded, x, cos, sin, mask, modality, cfg, bcfg, cache=cache)


@nnx.jit
def _head(decoder: Decoder, x):
    return decoder.head(x)


@nnx.jit
def _embed_tokens(decoder: Decoder, ids):
    return decoder.embed(ids)


def quantized_vision_features(model, family: str, vision_blocks: Sequence[Tree], cfg: InferenceSpec,
                              pixel_values, image_grid_thw=None, *, block=None) -> jax.Array:
    """Image features through folded vision blocks: Qwen2.5-VL ``(patches, C*T*P*P)`` +
    ``grid_thw`` -> merged tokens; LLaVA ``(n, 3, S, S)`` -> projected ``(n, tokens, d_text)``.

    ``model`` supplies everything but the blocks (patch embedding, rotary tables, merger /
    projector). ``block(folded, x, cos, sin, mask, modality)`` replaces the integer block (the
    fake-quant one in tests).
    """
    from splitq_jax import vision_block as vb
    from splitq_jax.models.qwen2_5_vl import segment_mask

    bcfg = vb.block_config(model, family)
    run = block or functools.partial(_block, cache=None, cfg=cfg, bcfg=bcfg)
    if family_of(family, model.config).vision_tower == "qwen_vit":  # window attention, then the merger
        tower = model.visual
        grid = tuple(tuple(int(v) for v in row) for row in np.asarray(image_grid_thw).reshape(-1, 3))
        inp = tower.block_inputs(jnp.asarray(pixel_values), grid)
        masks = {"full": segment_mask(inp.full_segments)[None], "window": segment_mask(inp.window_segments)[None]}
        x, cos, sin = inp.x[None], inp.cos[None], inp.sin[None]
        modality = jnp.full(x.shape[:2], VISION, jnp.int32)
        for folded, kind in zip(vision_blocks, tower.block_mask_kinds(), strict=True):
            x = run(folded, x, cos, sin, masks[kind], modality)
        return tower.merge(x[0], inp.window_index)
    # CLIP / DINOv2: patch embedding, blocks with full attention, then the projector.
    x = model.vision_tower.embed(jnp.asarray(pixel_values))
    none = jnp.zeros((*x.shape[:2], 0), jnp.float32)  # no rotary
    modality = jnp.full(x.shape[:2], VISION, jnp.int32)
    states = [x]
    for folded in vision_blocks:
        states.append(run(folded, states[-1], none, none, None, modality))
    return model.project_features(states)


@dataclasses.dataclass
class QuantizedModel:
    """A quantized model ready for inference.

    model: the family's NNX module without decoder layers (embed, vision, head);
    blocks: folded block trees, one per decoder layer; config: the full model config.
    """

    model: nnx.Module
    blocks: list[Tree]
    config: Any
    family: str
    spec: InferenceSpec  # all that inference reads (bit widths, symmetry, main path, text tokens)
    block_config: BlockConfig
    manifest: dict = dataclasses.field(default_factory=dict)
    vision_blocks: list[Tree] | None = None  # folded vision-tower blocks (None: the fp tower runs)
    vision_spec: InferenceSpec | None = None
    # Provenance only (inference reads ``spec``): the method's name and its options as saved.
    # Loading never builds a method config from them, so a method this version does not know
    # loads and runs all the same.
    method: str | None = None
    provenance: dict | None = None

    @classmethod
    def from_parts(cls, *, family: str, model_config, fp_params: Any, folded_blocks: Sequence[Tree],
                   method_config: Any = None, manifest: Mapping[str, Any] | None = None,
                   vision_blocks: Sequence[Tree] | None = None,
                   vision_method_config: Any = None, spec: InferenceSpec | None = None,
                   vision_spec: InferenceSpec | None = None) -> "QuantizedModel":
        """Assemble from in-memory pieces (the arguments of :func:`splitq_jax.quantized.export.save_quantized`).
        ``spec`` / ``vision_spec`` default to those of the method configs."""
        if spec is None:
            if method_config is None:
                raise CheckpointError("a quantized model needs its inference spec or its method config")
            spec = InferenceSpec.of(method_config)
        if vision_spec is None and vision_method_config is not None:
            vision_spec = InferenceSpec.of(vision_method_config)

        fp = export.fp_state_dict(fp_params)
        if vision_blocks is not None:
            from splitq_jax import vision_block as vb

            if vision_spec is None:
                raise CheckpointError("quantized vision blocks without their inference spec or method config")
            fp = export.strip_vision_layers(fp, family)
            n = vb.num_quantized_blocks(model_config, family)
            if len(vision_blocks) != n:
                raise CheckpointError(f"{len(vision_blocks)} vision blocks for a tower that quantizes {n}")
        dtypes = {jnp.dtype(v.dtype) for v in jax.tree_util.tree_leaves(fp)}
        dtype = dtypes.pop() if len(dtypes) == 1 else jnp.float32
        abstract = export.abstract_fp_model(family, model_config, dtype)
        if vision_blocks is not None:
            abstract = export.drop_vision_layers(abstract, family)
        graphdef, state = nnx.split(abstract)
        try:
            nnx.replace_by_pure_dict(state, fp)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"the saved fp parameters do not fit the {family} config: {e}") from e
        if len(folded_blocks) != model_config.text.num_layers:
            raise CheckpointError(f"{len(folded_blocks)} blocks for {model_config.text.num_layers} decoder layers")
        return cls(nnx.merge(graphdef, state), list(folded_blocks), model_config, family, spec,
                   BlockConfig.from_decoder(model_config.text), dict(manifest or {}),
                   None if vision_blocks is None else list(vision_blocks), vision_spec,
                   (manifest or {}).get("method", getattr(method_config, "method", None)),
                   (manifest or {}).get("method_config",
                                        None if method_config is None else method_config.to_dict()))

    # -- pieces -------------------------------------------------------------------------------

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None):
        """The family's ``embed`` (hidden, position_ids, modality_mask)."""
        encoder = None if self.vision_blocks is None else self.vision_features
        if family_of(self.family, self.config).takes_grid:
            return self.model.embed(input_ids, pixel_values, image_grid_thw, attention_mask, vision_encoder=encoder)
        if image_grid_thw is not None:
            raise ValueError("image_grid_thw is a Qwen2.5-VL input; LLaVA images are (n, 3, S, S) pixel_values")
        return self.model.embed(input_ids, pixel_values, attention_mask, vision_encoder=encoder)

    def vision_features(self, pixel_values, image_grid_thw=None, *, block=None) -> jax.Array:
        """Image features from the quantized vision tower (needs ``vision_blocks``); see
        :func:`quantized_vision_features`."""
        if self.vision_blocks is None:
            raise ValueError("this checkpoint's vision tower is not quantized; use the model's own embed")
        return quantized_vision_features(self.model, self.family, self.vision_blocks, self.vision_spec,
                                         pixel_values, image_grid_thw, block=block)

    def run_blocks(self, x, cos, sin, mask, modality, caches: list[KVCache] | None = None):
        """Every quantized block: ``x (B, N, d)`` -> ``(B, N, d)`` (and the updated caches if given)."""
        cfg, bcfg = self.spec, self.block_config
        if caches is None:
            for folded in self.blocks:
                x = _block(folded, x, cos, sin, mask, modality, None, cfg=cfg, bcfg=bcfg)
            return x
        new = []
        for folded, cache in zip(self.blocks, caches, strict=True):
            x, cache = _block(folded, x, cos, sin, mask, modality, cache, cfg=cfg, bcfg=bcfg)
            new.append(cache)
        return x, new

    def head(self, x) -> jax.Array:
        """Final norm + LM head: ``(B, N, d)`` -> ``(B, N, vocab)``."""
        return _head(self.model.language_model, x)

    # -- whole model --------------------------------------------------------------------------

    def logits(self, batch: Mapping[str, Any]) -> jax.Array:
        """Logits ``(B, N, vocab)`` for a batch dict (:mod:`splitq_jax.models.forward`): the
        family's embedding (through the quantized vision tower when there is one), every
        quantized block, the head. ``modality`` in the batch overrides the model's own codes, so
        that answer tokens keep their code."""
        encoder = None if self.vision_blocks is None else self.vision_features
        return forward.logits(self.model, self.family, batch, blocks=self.run_blocks, vision_encoder=encoder)

    def generate(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, *,
                 max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, use_cache: bool = True, return_logits: bool = False,
                 on_token=None):
        """Greedy decoding. Returns the new tokens ``(B, max_new_tokens)`` (and, with
        ``return_logits``, the logits that chose them, ``(B, steps, vocab)``). ``on_token(tokens (B,))``
        streams each step's tokens.

        Batched prompts must be left-padded. After a row emits EOS it is filled with
        ``pad_token_id`` (the families' ``generate`` behaviour). ``use_cache=False`` recomputes the
        whole sequence at every step (slow; the reference for the cache).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        emb = self.embed(np.asarray(input_ids), pixel_values, image_grid_thw, attention_mask)
        start = self._cached_decoding if use_cache else self._recomputed_decoding
        return greedy_generate(emb, lambda valid: start(emb, valid, max_new_tokens),
                               max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               default_pad_token_id=self.config.pad_token_id, return_logits=return_logits,
                               on_token=on_token)

    def _cached_decoding(self, emb, valid: np.ndarray, max_new_tokens: int):
        """``start`` of :func:`~splitq_jax.models.decode.greedy_generate`: the prompt through every
        block into fresh KV caches; the step feeds one token through them."""
        b, n = valid.shape
        t, bcfg = self.config.text, self.block_config
        key_valid = cache_key_valid(valid, max_new_tokens)
        caches = [KVCache.init(b, n + max_new_tokens, bcfg.num_kv_heads, bcfg.head_dim, self.model.dtype)
                  for _ in range(t.num_layers)]
        cos, sin = self.model.rope(emb.position_ids)
        mask = make_attention_mask(key_valid, num_queries=n)
        x, caches = self.run_blocks(emb.hidden, cos, sin, mask, emb.modality_mask, caches)
        answer = jnp.full((b, 1), ANSWER, jnp.int32)

        def step(token, pos):
            nonlocal caches
            cos, sin = self.model.rope(pos)
            mask = make_attention_mask(key_valid, query_offset=caches[0].index, num_queries=1)
            x, caches = self.run_blocks(_embed_tokens(self.model.language_model, token), cos, sin, mask,
                                        answer, caches)
            return self.head(x)[:, 0]

        return self.head(x[:, -1:])[:, 0], step

    def _recomputed_decoding(self, emb, valid: np.ndarray, max_new_tokens: int):
        """Like :meth:`_cached_decoding`, recomputing every position at every step. The sequence lives
        in a fixed buffer of ``prompt + max_new_tokens`` slots whose unused tail is padding (causal
        attention never reads it), so every step reuses one compiled program."""
        hidden, pos, modality = emb.hidden, emb.position_ids, emb.modality_mask
        b, n, _ = hidden.shape
        hidden = jnp.pad(hidden, ((0, 0), (0, max_new_tokens), (0, 0)))
        pos = jnp.pad(pos, [(0, 0)] * (pos.ndim - 1) + [(0, max_new_tokens)])
        modality = jnp.pad(modality, ((0, 0), (0, max_new_tokens)), constant_values=PAD)
        last = n - 1

        def forward():
            cos, sin = self.model.rope(pos)
            x = self.run_blocks(hidden, cos, sin, self.model.attention_mask(modality), modality)
            return self.head(jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1))[:, 0]

        def step(token, p_new):
            nonlocal hidden, pos, modality, last
            x_new = _embed_tokens(self.model.language_model, token)
            last += 1
            hidden = hidden.at[:, last].set(x_new[:, 0].astype(hidden.dtype))
            # M-RoPE positions (3, B, N): text advances on all three axes together.
            pos = pos.at[..., last].set(p_new[:, 0].astype(pos.dtype))
            modality = modality.at[:, last].set(ANSWER)
            return forward()

        return forward(), step


def load_quantized(ckpt_dir: str | os.PathLike, *, verify: bool = True) -> QuantizedModel:
    """Load a checkpoint written by :func:`splitq_jax.quantized.export.save_quantized`.

    ``verify`` recomputes every file's sha256 first. A missing manifest (an interrupted export), an
    unknown format version or a corrupted file raises :class:`~splitq_jax.quantized.export.CheckpointError`.
    """
    manifest, fp, blocks, vision_blocks = export.load_quantized_parts(ckpt_dir, verify=verify)
    family = manifest["model"]["family"]
    try:
        model_config = export.model_config_from_dict(family, manifest["model"]["config"])
        # What inference needs comes from "inference" (older checkpoints: the method config's
        # fields of the same names); the method config itself is provenance only.
        spec = InferenceSpec.from_dict(manifest.get("inference") or manifest["method_config"])
        vspec = None
        if vision_blocks is not None:
            vision = manifest["vision"]
            vspec = InferenceSpec.from_dict(vision.get("inference") or vision["method_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir}: the manifest's model config or inference spec is invalid: {e}") from e
    return QuantizedModel.from_parts(family=family, model_config=model_config, fp_params=fp, folded_blocks=blocks,
                                     manifest=manifest, vision_blocks=vision_blocks, spec=spec, vision_spec=vspec)


__all__ = ["QuantizedModel", "load_quantized", "quantized_block_forward", "quantized_vision_features"]
