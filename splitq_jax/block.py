"""A pure-functional Qwen2/Llama-style decoder block, the unit of calibration.

``x -> x + Attn(RMSNorm(x)) -> h + SwiGLU(RMSNorm(h))`` with q/k/v biases (Qwen2) or none (Llama),
grouped-query attention and rotary embeddings supplied from outside as ``(cos, sin)`` in the
rotate-half convention (so 1-D RoPE and Qwen2.5-VL's M-RoPE are both just inputs).

Block parameters (HF orientation, ``y = x @ w.T + b``)::

    {"input_layernorm": {"scale": (d,)},
     "q_proj": {"w": (H*hd, d), "b": (H*hd,)}, "k_proj": {...}, "v_proj": {...}, "o_proj": {"w": (d, H*hd)},
     "post_attention_layernorm": {"scale": (d,)},
     "gate_proj": {"w": (I, d)}, "up_proj": {"w": (I, d)}, "down_proj": {"w": (d, I)}}

The seven linears form four groups that share an input (one activation quantizer each):
``attn_in`` (q, k, v), ``attn_out`` (o), ``mlp_in`` (gate, up), ``mlp_out`` (down).

A block configuration is also the block's *architecture* for calibration, folding and inference:
``bcfg.groups`` (group -> linear names), ``bcfg.group_norm`` (group -> the norm producing its input),
``bcfg.norm_keys`` and ``bcfg.forward(norms, linear, x, cos, sin, mask, capture=, cache=)``. The
vision towers' blocks (:mod:`splitq_jax.vision_block`) implement the same four members, so every
calibration and folding function works on them unchanged.

This is also the Flax model's decoder layer: :class:`splitq_jax.models.layers.DecoderLayer` runs
:func:`block_forward` with its own modules as the linears, so the model, the calibration targets and
the quantized runtime share one block body (the pieces are :mod:`splitq_jax.models.ops`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

# The math itself (norm, rope, attention, cache) is shared with the Flax modules, which run this
# very block body (splitq_jax.models.layers.DecoderLayer): one definition, one set of numerics.
from splitq_jax.models.ops import KVCache, apply_rope, dot_product_attention, get_activation, rms_norm, rope_cos_sin

GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("q_proj", "k_proj", "v_proj"),
    "attn_out": ("o_proj",),
    "mlp_in": ("gate_proj", "up_proj"),
    "mlp_out": ("down_proj",),
}
# The norm whose output feeds a group (where a diagonal scale can be folded), if any.
GROUP_NORM = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}

Linear = Callable[[str, jax.Array], dict[str, jax.Array]]


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_eps: float = 1e-6
    qkv_bias: bool = True
    act: str = "silu"  # the MLP's gate activation (HF ``hidden_act``)

    # -- architecture protocol (see the module docstring) ---------------------------------------
    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        return GROUPS

    @property
    def group_norm(self) -> dict[str, str]:
        return GROUP_NORM

    @property
    def norm_keys(self) -> tuple[str, ...]:
        return ("input_layernorm", "post_attention_layernorm")

    def forward(self, norms, linear, x, cos, sin, mask, *, capture=None, cache=None):
        return block_forward(norms, linear, x, cos, sin, mask, self, capture=capture, cache=cache)

    @classmethod
    def from_decoder(cls, text_cfg) -> "BlockConfig":
        """The block shape of a model's decoder (a ``splitq_jax.models.layers.DecoderConfig``)."""
        return cls(hidden=text_cfg.hidden_size, intermediate=text_cfg.intermediate_size,
                   num_heads=text_cfg.num_heads, num_kv_heads=text_cfg.num_kv_heads,
                   head_dim=text_cfg.resolved_head_dim, rms_eps=text_cfg.rms_norm_eps,
                   qkv_bias=text_cfg.qkv_bias, act=text_cfg.hidden_act)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None:
            if self.hidden % self.num_heads:
                raise ValueError("hidden must be divisible by num_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden // self.num_heads)


def dense_linear(params: dict[str, Any], groups: dict[str, tuple[str, ...]] = GROUPS) -> Linear:
    """Full-precision group application from block parameters."""

    def linear(group: str, x: jax.Array) -> dict[str, jax.Array]:
        out = {}
        for name in groups[group]:
            y = x @ params[name]["w"].T.astype(x.dtype)
            if params[name].get("b") is not None:
                y = y + params[name]["b"].astype(x.dtype)
            out[name] = y
        return out

    return linear


def block_forward(
    norms: dict[str, Any],
    linear: Linear,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array,
    cfg: BlockConfig,
    *,
    capture: dict[str, jax.Array] | None = None,
    cache: KVCache | None = None,
) -> jax.Array | tuple[jax.Array, KVCache]:
    """One decoder block. ``x: (B, N, d)`` -> ``(B, N, d)``.

    Args:
      norms: ``{"input_layernorm": {"scale"}, "post_attention_layernorm": {"scale"}}`` (block params
        work as they are).
      linear: ``linear(group, input) -> {name: output}`` (dense or quantized).
      capture: if a dict, each group's input is stored in it (for statistics).
      cache: optional :class:`~splitq_jax.models.ops.KVCache` (``k, v: (B, S_max, KV, hd)``, rotated
        keys, and the write index). The new keys/values are written at slots ``[index, index + N)``,
        attention reads all ``S_max`` slots, so ``mask`` must be ``(B, N, S_max)``
        (:func:`splitq_jax.models.ops.make_attention_mask` with ``query_offset=index``).
    Returns:
      ``x`` without a cache; ``(x, updated cache)`` with one.
    """
    b, n, _ = x.shape
    hd = cfg.head_dim

    def run(group: str, inp: jax.Array) -> dict[str, jax.Array]:
        if capture is not None:
            capture[group] = inp
        return linear(group, inp)

    h = rms_norm(x, norms["input_layernorm"]["scale"], cfg.rms_eps)
    qkv = run("attn_in", h)
    q = apply_rope(qkv["q_proj"].reshape(b, n, cfg.num_heads, hd), cos, sin)
    k = apply_rope(qkv["k_proj"].reshape(b, n, cfg.num_kv_heads, hd), cos, sin)
    v = qkv["v_proj"].reshape(b, n, cfg.num_kv_heads, hd)
    if cache is not None:
        cache = cache.append(k, v)
        k, v = cache.k, cache.v
    a = dot_product_attention(q, k, v, mask, hd ** -0.5)
    x = x + run("attn_out", a.reshape(b, n, cfg.num_heads * hd))["o_proj"]
    h = rms_norm(x, norms["post_attention_layernorm"]["scale"], cfg.rms_eps)
    gu = run("mlp_in", h)
    m = get_activation(cfg.act)(gu["gate_proj"]) * gu["up_proj"]
    out = x + run("mlp_out", m)["down_proj"]
    return out if cache is None else (out, cache)


def fp_block(params: dict[str, Any], x, cos, sin, mask, cfg, capture=None) -> jax.Array:
    """The full-precision block from its parameters (any architecture, see the module docstring)."""
    return cfg.forward(params, dense_linear(params, cfg.groups), x, cos, sin, mask, capture=capture)


def causal_mask(valid: jax.Array) -> jax.Array:
    """``(B, N)`` bool (False = pad) -> ``(B, N, N)`` causal mask that never lets a query see pads.

    Pad queries attend to themselves only, so their (ignored) outputs stay finite.
    """
    n = valid.shape[-1]
    tri = jnp.tril(jnp.ones((n, n), bool))
    m = tri[None] & valid[:, None, :]
    return m | jnp.eye(n, dtype=bool)[None]


def rope_1d(positions: jax.Array, head_dim: int, theta: float = 1e6) -> tuple[jax.Array, jax.Array]:
    """Plain 1-D rotary tables ``(cos, sin)`` of shape ``(B, N, head_dim)`` for ``positions: (B, N)``."""
    return rope_cos_sin(positions, head_dim, theta)


def init_block_params(key: jax.Array, cfg: BlockConfig, scale: float = 0.02) -> dict[str, Any]:
    """Random block parameters of the layout above (tests, benchmarks)."""
    d, i, hd = cfg.hidden, cfg.intermediate, cfg.head_dim
    shapes = {
        "q_proj": (cfg.num_heads * hd, d), "k_proj": (cfg.num_kv_heads * hd, d),
        "v_proj": (cfg.num_kv_heads * hd, d), "o_proj": (d, cfg.num_heads * hd),
        "gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i),
    }
    keys = jax.random.split(key, 2 * len(shapes) + 2)
    p: dict[str, Any] = {}
    for j, (name, shp) in enumerate(sorted(shapes.items())):
        p[name] = {"w": scale * jax.random.normal(keys[2 * j], shp, jnp.float32)}
        if cfg.qkv_bias and name in ("q_proj", "k_proj", "v_proj"):
            p[name]["b"] = scale * jax.random.normal(keys[2 * j + 1], (shp[0],), jnp.float32)
    p["input_layernorm"] = {"scale": 1.0 + 0.1 * jax.random.normal(keys[-2], (d,), jnp.float32)}
    p["post_attention_layernorm"] = {"scale": 1.0 + 0.1 * jax.random.normal(keys[-1], (d,), jnp.float32)}
    return p
