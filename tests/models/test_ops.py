"""One decoder-block math (splitq_jax.models.ops) behind the model layers and the calibration block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from splitq_jax import block, vision_block
from splitq_jax.models import layers, ops


def test_block_and_layers_share_one_definition():
    for name in ("rms_norm", "apply_rope", "KVCache"):
        assert getattr(block, name) is getattr(ops, name) is getattr(layers, name)
    assert layers.dot_product_attention is ops.dot_product_attention is block.dot_product_attention
    assert vision_block.layers.apply_rope is ops.apply_rope


def test_rms_norm_casts_before_the_scale_as_hf_does():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16), jnp.float32).astype(jnp.bfloat16)
    scale = (1.0 + 0.3 * jax.random.normal(jax.random.PRNGKey(1), (16,))).astype(jnp.bfloat16)
    xf = x.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
    got = ops.rms_norm(x, scale, 1e-6)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(scale * normed, np.float32))


def test_decoder_layer_is_the_block_body_with_a_cache():
    """The NNX layer, fed token by token through a KV cache, equals the functional block over the
    whole sequence (the same function, so float32 agrees to round-off of the shorter reductions)."""
    dc = layers.DecoderConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                              num_kv_heads=2, qkv_bias=True)
    layer = layers.DecoderLayer(dc, rngs=nnx.Rngs(3))
    bcfg = block.BlockConfig.from_decoder(dc)
    assert layer.block_config == bcfg
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 32))
    cos, sin = block.rope_1d(jnp.arange(5)[None], bcfg.head_dim, dc.rope_theta)
    want = block.fp_block(layer.block_params(), x, cos, sin, block.causal_mask(jnp.ones((1, 5), bool)), bcfg)
    cache = ops.KVCache.init(1, 5, bcfg.num_kv_heads, bcfg.head_dim)
    key_valid = jnp.ones((1, 5), bool)
    outs = []
    for i in range(5):
        mask = ops.make_attention_mask(key_valid, query_offset=cache.index, num_queries=1)
        y, cache = layer(x[:, i:i + 1], cos[:, i:i + 1], sin[:, i:i + 1], mask, cache)
        outs.append(y)
    assert int(cache.index) == 5
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(want), rtol=1e-5, atol=1e-5)
