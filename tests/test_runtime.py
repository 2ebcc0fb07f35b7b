"""Integer inference: the real low-bit linear against the fake-quant fold, the KV cache, generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax.methods import transform
from splitq_jax import calibrate as cal
from splitq_jax import runtime
from splitq_jax.quantized import fold, qlinear
from splitq_jax.block import GROUPS, BlockConfig, block_forward, causal_mask, dense_linear, init_block_params, rope_1d
from splitq_jax.config import method_config
from splitq_jax.models.layers import KVCache, make_attention_mask
from splitq_jax.packing import PackedTensor
from test_export import QWEN_CFG, tiny_quantized_qwen  # tests/ is on sys.path under pytest

BCFG = BlockConfig(hidden=48, intermediate=96, num_heads=4, num_kv_heads=2)
S, N, N_VIS = 2, 16, 6

# (id, method, bits, overrides): every weight/activation quantizer shape the integer path handles.
CONFIGS = [
    ("w4a4-sym-masked", "splitq", "w4a4", {}),
    ("w4a4-asym-gathered", "splitq", "w4a4", {"w_symmetric": False, "a_symmetric": False, "main_path": "gathered"}),
    ("w4a8-sym-gathered", "splitq", "w4a8", {"main_path": "gathered"}),
    ("w4a8-asym-groups", "splitq", "w4a8", {"w_symmetric": False, "a_symmetric": False, "w_group_size": 16}),
    ("w3a3-asym-masked", "splitq", "w3a3", {"w_symmetric": False, "a_symmetric": False}),
    ("w3a2-sym-groups", "splitq", "w3a2", {"w_group_size": 16}),
    ("w3a2-asym-gathered", "splitq", "w3a2", {"a_symmetric": False, "main_path": "gathered"}),
    ("flatquant-w4a4-asym", "flatquant", "w4a4", {"w_symmetric": False, "a_symmetric": False}),  # no split/branches
    ("rtn-w4a4", "rtn", "w4a4", {}),  # no transform
    ("w4a16", "splitq", "w4a16", {}),  # weight-only: float fallback
    ("w16a4", "splitq", "w16a4", {}),  # float weights: float fallback
]
# slow: the gathered path and groups are each covered twice more in make test
SLOW_CONFIGS = ("w4a8-sym-gathered", "w3a2-sym-groups")
# Three linears sharing one input, outlier groups (with splitq) and branches; one compile per config.
TEST_GROUPS = ("attn_in",)


@pytest.fixture(scope="module")
def data():
    params = init_block_params(jax.random.PRNGKey(0), BCFG, scale=0.15)
    x = jax.random.normal(jax.random.PRNGKey(1), (S, N, BCFG.hidden))
    is_vis = jnp.arange(N) < N_VIS
    gain = jnp.ones((N, BCFG.hidden)).at[:, 12].set(jnp.where(is_vis, 20.0, 1.0)).at[:, 5].set(jnp.where(is_vis, 1.0, 15.0))
    modality = jnp.where(is_vis, cal.VISION, cal.TEXT)[None].repeat(S, 0)
    valid = jnp.ones((S, N), bool).at[-1, :2].set(False)  # one left-padded sample
    modality = jnp.where(valid, modality, cal.PAD)
    cos, sin = rope_1d(jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0), BCFG.head_dim)
    return params, x * gain, cos, sin, causal_mask(valid), modality


@pytest.fixture(scope="module")
def stats(data):
    params, x, cos, sin, mask, modality = data
    d = cal.BlockData(x, x, cos, sin, mask, modality)
    return {split: cal.collect_stats(params, d, method_config("splitq" if split else "flatquant"), BCFG)
            for split in (True, False)}


@pytest.fixture(scope="module")
def group_inputs(data):
    params, x, cos, sin, mask, _ = data

    @jax.jit
    def capture(params, x):
        cap: dict = {}
        block_forward(params, dense_linear(params), x, cos, sin, mask, BCFG, capture=cap)
        return cap

    return capture(params, x)


def _init(data, stats, cfg):
    """Calibration state straight from initialisation (``fit_block(epochs=0)`` without the loss)."""
    return cal.init_qblock(jax.random.PRNGKey(2), data[0], stats[cfg.split], cfg, BCFG)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _eqns(jaxpr):
    """Every equation of ``jaxpr``, nested jaxprs (jit, custom_jvp, ...) included."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _is_packed(t):
    return isinstance(t, PackedTensor)


@pytest.mark.parametrize("method,bits,kw", [pytest.param(*c[1:], id=c[0], marks=[pytest.mark.slow] * (c[0] in SLOW_CONFIGS))
                                             for c in CONFIGS])
def test_integer_group_matches_fake_quant(data, stats, group_inputs, method, bits, kw):
    cfg = method_config(method, bits, mac_gate_init=0.7, **kw)
    qp, qc = _init(data, stats, cfg)
    tmask = cal.text_mask_of(data[5], cfg)

    def integer(folded, inputs):
        return {g: qlinear.quantized_group_apply(folded[g], inputs[g], tmask, cfg) for g in TEST_GROUPS}

    def fold_groups(qp, qc):
        return {g: transform.fold_group(qp[g], qc[g], cfg) for g in TEST_GROUPS}

    @jax.jit  # one program per config: folding, both paths
    def run(qp, qc, inputs):
        folded = fold_groups(qp, qc)
        ref = {g: fold.folded_group_forward(folded[g], inputs[g], tmask, cfg) for g in TEST_GROUPS}
        return ref, integer(folded, inputs)

    ref, got = run(qp, qc, group_inputs)
    for group in TEST_GROUPS:
        assert set(got[group]) == set(GROUPS[group])
        for name, y in got[group].items():
            assert y.dtype == ref[group][name].dtype and y.shape == ref[group][name].shape
            assert _rel(y, ref[group][name]) < 1e-5, (group, name)

    # Every packed weight is applied by one int8 x int8 -> int32 dot (none with float fallbacks).
    folded = jax.eval_shape(fold_groups, qp, qc)
    dots = [e for e in _eqns(jax.make_jaxpr(integer)(folded, group_inputs).jaxpr) if e.primitive.name == "dot_general"]
    int_dots = [e for e in dots if all(v.aval.dtype == jnp.int8 for v in e.invars)]
    assert all(e.outvars[0].aval.dtype == jnp.int32 for e in int_dots)
    n_packed = sum(map(_is_packed, jax.tree_util.tree_leaves(folded, is_leaf=_is_packed)))
    assert len(int_dots) == (n_packed if cfg.w_bits and cfg.a_bits else 0)
    if method == "splitq" and cfg.w_bits:  # q/k/v: main, cws (2), mac (2), text, vision
        assert n_packed == 3 * 7


def test_block_kv_cache_matches_full_forward(data):
    params, x, cos, sin, _, modality = data
    valid = modality != cal.PAD

    @jax.jit
    def step(x, cos, sin, mask, cache):
        return block_forward(params, dense_linear(params), x, cos, sin, mask, BCFG, cache=cache)

    full = jax.jit(lambda x: block_forward(params, dense_linear(params), x, cos, sin, causal_mask(valid), BCFG))(x)
    split = 12  # prefill 12 tokens, then decode the rest one at a time
    cache = KVCache.init(S, N, BCFG.num_kv_heads, BCFG.head_dim)
    y, cache = step(x[:, :split], cos[:, :split], sin[:, :split], make_attention_mask(valid, num_queries=split), cache)
    outs = [y]
    for t in range(split, N):
        mask = make_attention_mask(valid, query_offset=cache.index, num_queries=1)
        y, cache = step(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], mask, cache)
        outs.append(y)
    assert int(cache.index) == N
    got = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(valid)], np.asarray(full)[np.asarray(valid)],
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Whole model


def test_quantized_model_matches_fake_quant_and_caches_exactly():
    cfg = QWEN_CFG
    model, folded, batch = tiny_quantized_qwen(cfg)
    qm = runtime.QuantizedModel.from_parts(family="qwen2_5_vl", model_config=model.config, fp_params=model,
                                           folded_blocks=folded, method_config=cfg)
    # integer blocks == the fake-quant fold, chained through the whole model
    logits = qm.logits(batch)
    emb = model.embed(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], batch["attention_mask"])
    cos, sin = model.rope(emb.position_ids)
    mask = model.attention_mask(emb.modality_mask)
    fake = jax.jit(lambda f, x: fold.folded_block_forward(f, x, cos, sin, mask, emb.modality_mask, cfg,
                                                          qm.block_config))
    x = emb.hidden
    for f in folded:
        x = fake(f, x)
    ref = model.head(x)
    valid = np.asarray(emb.modality_mask != cal.PAD)
    assert np.abs(np.asarray(logits - ref))[valid].max() < 1e-5 * np.abs(np.asarray(ref)).max()

    # greedy decoding with the KV cache == recomputing the whole sequence at every step
    args = (batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], batch["attention_mask"])
    cached, lc = qm.generate(*args, max_new_tokens=5, return_logits=True)
    plain, lp = qm.generate(*args, max_new_tokens=5, use_cache=False, return_logits=True)
    np.testing.assert_array_equal(cached, plain)
    assert np.abs(lc - lp).max() < 1e-5 * np.abs(lp).max()
    np.testing.assert_allclose(lc[:, 0], np.asarray(logits[:, -1]), rtol=0, atol=1e-5 * np.abs(lp).max())

    # EOS: a row that emits it is padded afterwards
    eos = int(cached[0, 0])
    stopped = qm.generate(*args, max_new_tokens=5, eos_token_id=eos, pad_token_id=0)
    for row, seq in zip(stopped, cached):
        k = int(np.argmax(seq == eos)) + 1 if (seq == eos).any() else seq.size
        np.testing.assert_array_equal(row[:k], seq[:k])
        assert (row[k:] == 0).all()


def test_loaded_model_group_path_runs_the_pallas_split_gemm(data, stats, group_inputs):
    """The runtime's group path takes the packed split GEMM; the Pallas kernel (interpreted on CPU)
    gives what its XLA reference gives, and both match the fake-quant model."""
    cfg = method_config("splitq", "w4a4", mac_gate_init=0.7)
    qp, qc = _init(data, stats, cfg)
    tmask = cal.text_mask_of(data[5], cfg)
    folded = transform.fold_group(qp["attn_in"], qc["attn_in"], cfg)
    x = group_inputs["attn_in"]
    ref = fold.folded_group_forward(folded, x, tmask, cfg)
    via_xla = qlinear.quantized_group_apply(folded, x, tmask, cfg, implementation="xla")
    via_pallas = qlinear.quantized_group_apply(folded, x, tmask, cfg, implementation="pallas")
    for name in GROUPS["attn_in"]:
        assert _rel(via_pallas[name], via_xla[name]) < 1e-6
        assert _rel(via_pallas[name], ref[name]) < 1e-5
