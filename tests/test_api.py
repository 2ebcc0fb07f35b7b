"""The README's functional-API example, with tiny shapes, through the public names only."""

import jax
import jax.numpy as jnp
import numpy as np

import splitq_jax as sq


def test_readme_example_uses_only_public_names():
    used = ("BlockConfig", "init_block_params", "make_block_data", "get_config", "calibrate_block", "fold_block",
            "load_quantized", "get_method", "SplitqError")
    assert set(used) <= set(sq.__all__)
    bcfg = sq.BlockConfig(hidden=32, intermediate=64, num_heads=2, num_kv_heads=1)
    params = sq.init_block_params(jax.random.PRNGKey(0), bcfg, scale=0.15)
    s, n = 4, 12
    x = jax.random.normal(jax.random.PRNGKey(1), (s, n, 32))
    modality = jnp.where(jnp.arange(n) < 5, 2, 1)[None].repeat(s, 0)
    from splitq_jax.block import causal_mask, rope_1d  # building inputs, not part of the example

    valid = jnp.ones((s, n), bool)
    cos, sin = rope_1d(jnp.cumsum(valid, axis=1) - 1, bcfg.head_dim)
    data = sq.make_block_data(params, x, cos, sin, causal_mask(valid), modality, bcfg)
    # rtn keeps this check cheap (nothing to compile for training); the calls are the example's
    cfg = sq.get_config("rtn", "w4a4")
    result = sq.calibrate_block(params, data, cfg, bcfg)
    folded = sq.fold_block(result, cfg, bcfg)
    assert np.isfinite(result.final_loss) and folded["groups"]["attn_in"]["weights"]["q_proj"]["main"].bits == 4
    assert sq.get_method("splitq").config().cws and isinstance(sq.SplitqError("x"), ValueError)
    # the method config and its engine setting calibrate identically
    again = sq.calibrate_block(params, data, cfg.engine_config(), bcfg)
    assert again.final_loss == result.final_loss
