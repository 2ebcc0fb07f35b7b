"""The transformer math every block shares, as plain functions of arrays.

One definition of each piece, used by the Flax modules (:mod:`splitq_jax.models.layers`, the
vision towers), the functional decoder block the calibration engine and the runtime run
(:mod:`splitq_jax.block`) and the functional vision blocks (:mod:`splitq_jax.vision_block`). A
model's forward and its calibrated/quantized forward therefore cannot drift apart: they differ only
in how a linear is applied.

Conventions (HF's, so that converted weights are a plain copy):

* RMSNorm/LayerNorm statistics and softmax are float32; results come back in the activation dtype.
* Rotary embedding uses the *rotate-half* convention: ``cos``/``sin`` are ``(B, N, head_dim)`` and
  the two halves of a head share frequencies. Whether the angles come from 1-D positions or from
  M-RoPE is decided by whoever builds the tables, never here.
* Attention masks are boolean, ``True`` = may attend, ``(B, N, S)``.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    # HF's "gelu" is the exact erf form; "gelu_pytorch_tanh"/"quick_gelu" are the approximations.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation function for an HF ``hidden_act`` name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm over the last axis: ``x (..., d)``, ``scale (d,)`` -> ``(..., d)`` in ``x.dtype``.

    Statistics in float32; the normalised value is cast back to ``x.dtype`` *before* the scale is
    applied (HF's order, which matters in bfloat16; in float32 both orders give the same bits).
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * xf.astype(x.dtype)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """LayerNorm over the last axis: statistics and affine in float32, output in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Rotary embeddings (rotate-half convention)
# --------------------------------------------------------------------------------------------


def rope_inv_freq(rotary_dim: int, theta: float) -> Array:
    """Inverse frequencies ``theta ** (-2i / rotary_dim)`` for i < rotary_dim/2; shape ``(rotary_dim/2,)``."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    return 1.0 / (theta ** exponents)


def rope_cos_sin(position_ids: Array, head_dim: int, theta: float,
                 dtype=jnp.float32) -> tuple[Array, Array]:
    """1-D rotary tables for integer ``position_ids (B, N)``: ``(cos, sin)`` each ``(B, N, head_dim)``.

    Angles are computed in float32 (positions can be large) and cast to ``dtype`` at the end.
    """
    freqs = position_ids.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: Array) -> Array:
    """``[x1, x2] -> [-x2, x1]`` over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x (B, N, heads, hd)`` by ``cos``/``sin (B, N, hd)`` (broadcast over heads).

    The tables are cast to ``x.dtype`` so that the rotation runs in the dtype the caller chose
    (Qwen's vision tower passes float32 ``x`` to rotate in float32, as HF does).
    """
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------
# Masks, attention, KV cache
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="num_queries")
def make_attention_mask(key_valid: Array, *, query_offset: Array | int = 0,
                        num_queries: int | None = None) -> Array:
    """Causal + padding mask, ``True`` = may attend.

    Args:
      key_valid: ``(B, S)`` bool, False at padding slots (and at unused KV-cache slots).
      query_offset: slot index of the first query (0 for a full forward; the number of tokens
        already in the cache when decoding). A scalar, may be traced.
      num_queries: number of queries N; defaults to ``S`` (full forward).
    Returns:
      ``(B, N, S)`` bool: query i (at slot ``query_offset + i``) sees key slot j iff
      ``j <= query_offset + i`` and ``key_valid[:, j]``.
    """
    s = key_valid.shape[1]
    n = s if num_queries is None else num_queries
    q_slot = query_offset + jnp.arange(n)[:, None]
    causal = jnp.arange(s)[None, :] <= q_slot
    return causal[None] & key_valid[:, None, :].astype(bool)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float) -> Array:
    """Grouped-query attention.

    Args:
      q: ``(B, N, H, hd)``; k, v: ``(B, S, KV, hd)`` with ``H % KV == 0`` (query head h reads KV
        head ``h // (H // KV)``, the HF ``repeat_kv`` grouping).
      mask: ``(B, N, S)`` bool (True = may attend) or None for full attention.
      scale: multiplies the scores (``hd ** -0.5``; a product, as HF computes it).
    Returns:
      ``(B, N, H, hd)`` in ``v.dtype``.

    Scores and softmax are float32. Masked scores get the most negative finite float rather than
    -inf so that a fully masked row (a padding query) yields a uniform, finite distribution instead
    of NaN; such rows are never read.
    """
    b, n, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, n, kv, h // kv, hd)
    scores = jnp.einsum("bnkgd,bskd->bkgns", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgns,bskd->bnkgd", probs, v)
    return out.reshape(b, n, h, hd)


class KVCache(NamedTuple):
    """Per-layer KV cache. ``k``/``v``: ``(B, S_max, KV, hd)`` (keys already rotated);
    ``index``: int32 scalar, number of filled slots (the slot the next token is written to)."""

    k: Array
    v: Array
    index: Array

    @classmethod
    def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        z = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
        return cls(z, z, jnp.zeros((), jnp.int32))

    def append(self, k: Array, v: Array) -> "KVCache":
        """Write ``k, v (B, N, KV, hd)`` at slots ``[index, index + N)``; the cache after the write."""
        start = (0, self.index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), start)
        v_all = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), start)
        return KVCache(k_all, v_all, self.index + k.shape[1])


__all__ = ["ACTIVATIONS", "Array", "KVCache", "apply_rope", "dot_product_attention", "get_activation",
           "layer_norm", "make_attention_mask", "rms_norm", "rope_cos_sin", "rope_inv_freq", "rotate_half"]
