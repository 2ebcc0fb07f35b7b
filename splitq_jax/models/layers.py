"""Shared transformer building blocks for the Flax NNX model ports.

Everything here is used by two model families:

* Qwen2.5-VL's language model: a Qwen2 decoder (q/k/v biases, grouped-query attention, M-RoPE);
* LLaVA's language model: a Llama decoder (no biases, 1-D rope).

Conventions, kept identical to the HF checkpoints so that conversion is a plain copy and the
calibration engine (``splitq_jax.block``) can consume the weights directly:

* Linear weights are stored in PyTorch orientation ``w: (d_out, d_in)``; ``y = x @ w.T + b``.
* Rotary embedding uses HF's *rotate-half* convention: ``cos``/``sin`` have shape
  ``(B, N, head_dim)`` and the first and second halves of a head share frequencies. Whether the
  angles come from 1-D positions or from Qwen's 3-D M-RoPE is decided by the caller, never inside
  a block.
* Attention masks are boolean, ``True`` = may attend, shape ``(B, N, S)`` where ``S = N`` without a
  KV cache and ``S = cache length`` with one. Causality and padding are both folded into the mask.
* A decoder layer's forward is ``layer(x, cos, sin, mask)`` -> ``x``, or
  ``layer(x, cos, sin, mask, cache)`` -> ``(x, cache)``.

Numerics follow the HF reference: RMSNorm and softmax are computed in float32 and cast back to the
activation dtype; parameters are created in the model ``dtype`` (float32 or bfloat16). The math
(norms, rope, attention, KV cache) is :mod:`splitq_jax.models.ops`; the decoder block's body is
:func:`splitq_jax.block.block_forward`, shared with calibration and the quantized runtime.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from splitq_jax.block import GROUPS, BlockConfig, block_forward
from splitq_jax.models.decode import cache_key_valid
# The shared math, re-exported: the model modules and converters import it from here.
from splitq_jax.models.ops import (ACTIVATIONS, Array, KVCache, apply_rope, dot_product_attention,  # noqa: F401
                                   get_activation, layer_norm, make_attention_mask, rms_norm, rope_cos_sin,
                                   rope_inv_freq, rotate_half)

# Initialisation only matters for random (test) models; real weights are always loaded.
_INIT_STD = 0.02

# --------------------------------------------------------------------------------------------
# Basic modules
# --------------------------------------------------------------------------------------------


class Linear(nnx.Module):
    """Dense layer with HF-oriented weight ``w: (d_out, d_in)`` and optional bias ``b: (d_out,)``.

    ``__call__``: ``x (..., d_in)`` -> ``(..., d_out)``.
    """

    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype=jnp.float32, rngs: nnx.Rngs):
        self.d_in, self.d_out = d_in, d_out
        self.w = nnx.Param(_INIT_STD * jax.random.normal(rngs.params(), (d_out, d_in), dtype))
        self.b = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum("...i,oi->...o", x, self.w[...])
        if self.b is not None:
            y = y + self.b[...]
        return y

    def params(self) -> dict[str, Array]:
        """``{"w": (d_out, d_in)[, "b": (d_out,)]}``, the layout ``splitq_jax.block`` consumes."""
        out = {"w": self.w[...]}
        if self.b is not None:
            out["b"] = self.b[...]
        return out


class Embedding(nnx.Module):
    """Token embedding table ``weight: (vocab, d)``. ``__call__``: ids ``(B, N)`` -> ``(B, N, d)``."""

    def __init__(self, vocab_size: int, d: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.weight = nnx.Param(_INIT_STD * jax.random.normal(rngs.params(), (vocab_size, d), dtype))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: Array) -> Array:
        """Tied output projection: ``(..., d)`` -> ``(..., vocab)``."""
        return jnp.einsum("...d,vd->...v", x, self.weight[...])


class LayerNorm(nnx.Module):
    """LayerNorm with ``scale``/``bias`` ``(d,)``; statistics in float32, output in ``x.dtype``."""

    def __init__(self, d: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((d,), dtype))
        self.bias = nnx.Param(jnp.zeros((d,), dtype))

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class RMSNorm(nnx.Module):
    """RMS normalisation over the last axis with a learned ``scale: (d,)``."""

    def __init__(self, d: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((d,), dtype))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps)


class GatedMLP(nnx.Module):
    """SwiGLU-style MLP: ``down(act(gate(x)) * up(x))``. ``(..., d)`` -> ``(..., d)``."""

    def __init__(self, d: int, intermediate: int, *, bias: bool = False, act: str = "silu",
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.act_name = act
        self.gate_proj = Linear(d, intermediate, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, intermediate, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate, d, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        act = get_activation(self.act_name)
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class Attention(nnx.Module):
    """The q/k/v/o projections of a grouped-query self-attention (optional q/k/v biases; ``o_proj``
    never has one, true for Qwen2 and Llama). The attention itself is the shared block body's
    (:func:`splitq_jax.block.block_forward`), which :class:`DecoderLayer` runs."""

    def __init__(self, d: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qkv_bias: bool,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(d, num_heads * head_dim, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, num_kv_heads * head_dim, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, num_kv_heads * head_dim, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(num_heads * head_dim, d, bias=False, dtype=dtype, rngs=rngs)


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Shape of a Qwen2/Llama-style decoder-only language model."""

    # sizes
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    # attention
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads
    qkv_bias: bool = False  # Qwen2: True; Llama: False
    rope_theta: float = 10000.0
    # misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


class DecoderLayer(nnx.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    ``__call__(x (B, N, d), cos (B, N, hd), sin (B, N, hd), mask (B, N, S)[, cache])``
    returns ``x`` without a cache and ``(x, cache)`` with one.

    The forward is :func:`splitq_jax.block.block_forward` (the block the calibration engine and the
    quantized runtime run) with this layer's modules as its linears: the math exists once.
    """

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.block_config = BlockConfig.from_decoder(cfg)  # static: a frozen dataclass
        self.input_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(d, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                                   qkv_bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(d, cfg.intermediate_size, bias=False, act=cfg.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array | None,
                 cache: KVCache | None = None):
        norms = {"input_layernorm": {"scale": self.input_layernorm.scale[...]},
                 "post_attention_layernorm": {"scale": self.post_attention_layernorm.scale[...]}}
        return block_forward(norms, self._linear, x, cos, sin, mask, self.block_config, cache=cache)

    def _linear(self, group: str, x: Array) -> dict[str, Array]:
        """The block body's ``linear(group, x) -> {name: output}``, by this layer's modules."""
        owner = self.self_attn if group.startswith("attn") else self.mlp
        return {name: getattr(owner, name)(x) for name in GROUPS[group]}

    def block_params(self) -> dict[str, dict[str, Array]]:
        """Plain dict of this block's weights in the layout ``splitq_jax.block`` consumes::

            {"input_layernorm": {"scale": (d,)},
             "q_proj": {"w": (H*hd, d)[, "b": (H*hd,)]}, "k_proj": {"w": (KV*hd, d)[, "b"]},
             "v_proj": {"w": (KV*hd, d)[, "b"]}, "o_proj": {"w": (d, H*hd)},
             "post_attention_layernorm": {"scale": (d,)},
             "gate_proj": {"w": (I, d)}, "up_proj": {"w": (I, d)}, "down_proj": {"w": (d, I)}}
        """
        attn, mlp = self.self_attn, self.mlp
        return {
            "input_layernorm": {"scale": self.input_layernorm.scale[...]},
            "q_proj": attn.q_proj.params(),
            "k_proj": attn.k_proj.params(),
            "v_proj": attn.v_proj.params(),
            "o_proj": attn.o_proj.params(),
            "post_attention_layernorm": {"scale": self.post_attention_layernorm.scale[...]},
            "gate_proj": mlp.gate_proj.params(),
            "up_proj": mlp.up_proj.params(),
            "down_proj": mlp.down_proj.params(),
        }


class Decoder(nnx.Module):
    """Token embedding, a stack of :class:`DecoderLayer`, final norm and LM head.

    Usable whole (``__call__`` runs every layer) or block by block (``layers[i]``); ``head``
    applies the final norm and the (tied or separate) output projection.
    """

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs))

    def embed(self, input_ids: Array) -> Array:
        """``(B, N)`` int -> ``(B, N, d)``."""
        return self.embed_tokens(input_ids)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array | None,
                 caches: list[KVCache] | None = None):
        """All layers (no final norm). Returns ``x`` or ``(x, caches)`` when ``caches`` is given."""
        if caches is None:
            for layer in self.layers:
                x = layer(x, cos, sin, mask)
            return x
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer(x, cos, sin, mask, cache)
            new_caches.append(cache)
        return x, new_caches

    def head(self, x: Array) -> Array:
        """Final norm + output projection: ``(B, N, d)`` -> logits ``(B, N, vocab)``."""
        x = self.norm(x)
        return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)

    def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """One empty :class:`KVCache` per layer, in the model dtype."""
        cfg = self.config
        return [KVCache.init(batch, max_len, cfg.num_kv_heads, cfg.resolved_head_dim, self.dtype)
                for _ in range(cfg.num_layers)]

    def rope(self, position_ids: Array) -> tuple[Array, Array]:
        """1-D rotary tables for ``position_ids (B, N)``: ``(cos, sin)`` each ``(B, N, hd)``."""
        return rope_cos_sin(position_ids, self.config.resolved_head_dim, self.config.rope_theta, self.dtype)


# --------------------------------------------------------------------------------------------
# Whole-decoder paths shared by every family. Each runs as one compiled program (rope, masks, all
# blocks, head); ``mrope_section`` (static) selects Qwen2.5-VL's M-RoPE, None the plain 1-D rope.


@functools.partial(jax.jit, static_argnames=("head_dim", "theta", "mrope_section", "dtype"))
def mrope_cos_sin(position_ids: Array, head_dim: int, theta: float, mrope_section: Sequence[int],
                  dtype=jnp.float32) -> tuple[Array, Array]:
    """M-RoPE tables for ``position_ids (3, B, N)`` (or 1-D ``(B, N)``): ``(cos, sin)`` each ``(B, N, hd)``.

    Frequency slot ``k < hd/2`` takes its angle from the temporal, height or width position according
    to which ``mrope_section`` it falls in; both halves of the head reuse the same slots
    (rotate-half convention).
    """
    if position_ids.ndim == 2:
        position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
    freqs = position_ids.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)  # (3,B,N,hd/2)
    axis_of_slot = np.repeat(np.arange(3), mrope_section)  # (hd/2,) which of t/h/w drives each slot
    freqs = jnp.moveaxis(freqs[axis_of_slot, ..., np.arange(axis_of_slot.size)], 0, -1)  # (B,N,hd/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def decoder_rope(decoder: "Decoder", position_ids: Array, mrope_section) -> tuple[Array, Array]:
    """``(cos, sin)`` for 1-D ``(B, N)`` positions, or M-RoPE ``(3, B, N)`` ones with a section."""
    if mrope_section is None:
        return decoder.rope(position_ids)
    t = decoder.config
    return mrope_cos_sin(position_ids, head_dim=t.resolved_head_dim, theta=t.rope_theta,
                         mrope_section=tuple(mrope_section), dtype=decoder.dtype)


@nnx.jit
def decoder_head(decoder: "Decoder", x: Array) -> Array:
    return decoder.head(x)


@functools.partial(nnx.jit, static_argnums=4)
def decoder_forward(decoder: "Decoder", x, position_ids, modality_mask, mrope_section=None):
    """Logits ``(B, N, vocab)`` from embeddings ``(B, N, d)``, positions and the ``(B, N)`` modality mask."""
    cos, sin = decoder_rope(decoder, position_ids, mrope_section)
    return decoder.head(decoder(x, cos, sin, make_attention_mask(modality_mask != 0)))


@functools.partial(nnx.jit, static_argnums=5)
def decoder_prefill(decoder: "Decoder", x, position_ids, key_valid, caches, mrope_section=None):
    """Fill the caches with the prompt; returns last-position logits ``(B, vocab)`` and caches."""
    cos, sin = decoder_rope(decoder, position_ids, mrope_section)
    mask = make_attention_mask(key_valid, num_queries=x.shape[1])
    x, caches = decoder(x, cos, sin, mask, caches)
    return decoder.head(x[:, -1:])[:, 0], caches


@functools.partial(nnx.jit, static_argnums=5)
def decoder_decode_step(decoder: "Decoder", token, position_ids, key_valid, caches, mrope_section=None):
    """One token per row: ``token (B, 1)`` at 1-D ``position_ids (B, 1)`` -> logits ``(B, vocab)``, caches."""
    cos, sin = decoder_rope(decoder, position_ids, mrope_section)
    mask = make_attention_mask(key_valid, query_offset=caches[0].index, num_queries=1)
    x, caches = decoder(decoder.embed(token), cos, sin, mask, caches)
    return decoder.head(x)[:, 0], caches


def decoder_decoding(decoder: "Decoder", emb, valid, max_new_tokens: int, mrope_section=None):
    """The ``start`` of :func:`splitq_jax.models.decode.greedy_generate` for a full-precision decoder:
    fills fresh KV caches (``prompt + max_new_tokens`` slots) with the prompt ``emb`` (hidden
    ``(B, N, d)``, ``position_ids``) and returns its last-position logits ``(B, vocab)`` and the cached
    ``step(token (B, 1), positions (B, 1)) -> (B, vocab)``."""
    b, n = valid.shape
    key_valid = cache_key_valid(valid, max_new_tokens)
    caches = decoder.init_cache(b, n + max_new_tokens)
    logits, caches = decoder_prefill(decoder, emb.hidden, emb.position_ids, key_valid, caches, mrope_section)

    def step(token, positions):
        nonlocal caches
        out, caches = decoder_decode_step(decoder, token, positions, key_valid, caches, mrope_section)
        return out

    return logits, step


def count_params(module: nnx.Module) -> int:
    """Number of parameter scalars (works on abstract modules from ``nnx.eval_shape``)."""
    state = nnx.state(module, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))
