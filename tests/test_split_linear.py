"""The split linear group (Eq. 6, 13-21): exact identities and the behaviour of each component."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax.methods.splitq import split_linear as sl
from splitq_jax.config import method_config

D = 48
TEXT_IDX = np.array([3, 17])
VISION_IDX = np.array([8, 40])


@pytest.fixture(scope="module")
def layer():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    weights = {
        "q": {"w": jax.random.normal(k[0], (32, D)), "b": jax.random.normal(k[1], (32,))},
        "k": {"w": jax.random.normal(k[2], (16, D))},
    }
    # heterogeneous activations: a few channels much larger than the rest
    x = jax.random.normal(k[3], (2, 12, D)) * jnp.where(jnp.isin(jnp.arange(D), np.r_[TEXT_IDX, VISION_IDX]), 20.0, 1.0)
    text_mask = jnp.arange(12)[None, :].repeat(2, 0) >= 4  # first 4 tokens are vision
    return weights, x, text_mask


def _init(weights, x, **kw):
    cfg = method_config("splitq", "w4a4", **kw)
    p, c = sl.init_group(jax.random.PRNGKey(1), weights, cfg, text_idx=TEXT_IDX, vision_idx=VISION_IDX,
                         act_absmax=jnp.max(jnp.abs(x), axis=(0, 1)))
    return cfg, p, c


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("main_path", ["masked", "gathered"])
@pytest.mark.parametrize("svd_of", ["weight", "transformed"])
def test_quantizers_off_equals_dense(layer, main_path, svd_of):
    weights, x, tmask = layer
    cfg, p, c = _init(weights, x, main_path=main_path, svd_of=svd_of)
    ref = sl.dense_forward(weights, x)
    out = sl.group_forward(p, c, x, tmask, cfg, quantize=False)
    for n in weights:
        assert _rel(out[n], ref[n]) < 2e-6


def test_identity_holds_for_any_gates_and_transform(layer):
    """R telescopes with the CWS part for any g_c; MAC is inactive without activation quantization."""
    weights, x, tmask = layer
    cfg, p, c = _init(weights, x)
    p = jax.tree_util.tree_map(lambda a: a, p)
    for n in p["weights"]:
        p["weights"][n]["cws_gate"] = p["weights"][n]["cws_gate"] * 0.3 + 0.5
        p["weights"][n]["mac_gate"] = p["weights"][n]["mac_gate"] + 0.7
    p["transform"]["c"] = p["transform"]["c"] * 1.7
    ref = sl.dense_forward(weights, x)
    out = sl.group_forward(p, c, x, tmask, cfg, quantize=False)
    for n in weights:
        assert _rel(out[n], ref[n]) < 2e-6


def test_channel_split_is_exact_eq6(layer):
    weights, x, _ = layer
    w = weights["q"]["w"]
    main = np.setdiff1d(np.arange(D), np.r_[TEXT_IDX, VISION_IDX])
    parts = sum(x[..., idx] @ w[:, idx].T for idx in (main, TEXT_IDX, VISION_IDX))
    assert _rel(parts, x @ w.T) < 1e-6


def test_mac_reaches_text_tokens_only(layer):
    weights, x, tmask = layer
    cfg, p, c = _init(weights, x, mac_gate_init=0.5)
    cfg0, p0, c0 = _init(weights, x, mac=False)
    out, out0 = sl.group_forward(p, c, x, tmask, cfg), sl.group_forward(p0, c0, x, tmask, cfg0)
    for n in weights:
        vis = ~np.asarray(tmask)
        np.testing.assert_array_equal(np.asarray(out[n])[vis], np.asarray(out0[n])[vis])
        assert float(jnp.max(jnp.abs(out[n] - out0[n])[np.asarray(tmask)])) > 1e-3


def test_mac_gate_zero_starts_as_without_mac(layer):
    weights, x, tmask = layer
    cfg, p, c = _init(weights, x)
    cfg0, p0, c0 = _init(weights, x, mac=False)
    out, out0 = sl.group_forward(p, c, x, tmask, cfg), sl.group_forward(p0, c0, x, tmask, cfg0)
    for n in weights:
        np.testing.assert_array_equal(np.asarray(out[n]), np.asarray(out0[n]))


def test_cws_residual_is_svd_tail(layer):
    """With an identity transform and g_c = 1, R = W_m^T minus its top-r part (Eq. 16, 20, 21)."""
    weights, x, _ = layer
    cfg, p, c = _init(weights, x, transform=False)
    r = sl.rank_of(cfg.cws_ratio, D, 32)
    assert r == 1 and sl.rank_of(0.03, 2048, 11008) == 62
    specs = sl.prequant_weights(p, c, cfg, sl.Bits.of(cfg))
    wm = np.asarray(weights["q"]["w"]).copy()
    wm[:, np.r_[TEXT_IDX, VISION_IDX]] = 0.0
    s_full = np.linalg.svd(wm, compute_uv=False)
    s_res = np.linalg.svd(np.asarray(specs["q"]["main"].w), compute_uv=False)
    np.testing.assert_allclose(s_res[: len(s_full) - r], s_full[r:], rtol=1e-4, atol=1e-4)


def test_auxiliary_paths_use_at_least_four_bits(layer):
    weights, x, _ = layer
    cfg = method_config("splitq", "w3a2")
    p, c = sl.init_group(jax.random.PRNGKey(0), weights, cfg, text_idx=TEXT_IDX, vision_idx=VISION_IDX)
    specs = sl.prequant_weights(p, c, cfg, sl.Bits.of(cfg))
    assert specs["q"]["main"].bits == 3
    for leaf in (specs["q"]["text"], specs["q"]["vision"], specs["q"]["cws"]["l_in"], specs["q"]["mac"]["l_out"]):
        assert leaf.bits == 4
    assert sl.Bits.of(cfg) == sl.Bits(3, 2, 4, 4)
    assert sl.Bits.of(method_config("splitq", "w4a8")) == sl.Bits(4, 8, 4, 8)
    # W3A2 uses the larger ranks of the paper
    assert (cfg.cws_ratio, cfg.mac_ratio) == (0.03, 0.05)


def test_quantized_split_beats_unsplit_on_planted_outliers(layer):
    """Moving the planted outlier channels to their own 4-bit paths lowers the W4A4 error."""
    weights, x, tmask = layer
    ref = sl.dense_forward(weights, x)
    base = dict(transform=False, cws=False, mac=False, learn_clip=False)
    cfg, p, c = _init(weights, x, **base)
    cfg_n = method_config("splitq", "w4a4", selector="none", **base)
    p_n, c_n = sl.init_group(jax.random.PRNGKey(1), weights, cfg_n)
    err_split = float(jnp.mean((sl.group_forward(p, c, x, tmask, cfg)["q"] - ref["q"]) ** 2))
    err_none = float(jnp.mean((sl.group_forward(p_n, c_n, x, tmask, cfg_n)["q"] - ref["q"]) ** 2))
    assert err_split < 0.5 * err_none


def test_bad_groups_raise(layer):
    weights, x, _ = layer
    cfg = method_config("splitq", "w4a4")
    with pytest.raises(ValueError, match="disjoint"):
        sl.init_group(jax.random.PRNGKey(0), weights, cfg, text_idx=np.array([1, 2]), vision_idx=np.array([2]))
    with pytest.raises(ValueError, match="out of range"):
        sl.init_group(jax.random.PRNGKey(0), weights, cfg, text_idx=np.array([D]))
    with pytest.raises(ValueError, match="no main channels"):
        sl.init_group(jax.random.PRNGKey(0), weights, cfg, text_idx=np.arange(D))
    bad = {"q": weights["q"], "k": {"w": jnp.ones((16, D + 1))}}
    with pytest.raises(ValueError, match="share one input"):
        sl.init_group(jax.random.PRNGKey(0), bad, cfg)


def test_grouped_weights_with_per_row_clip(layer):
    """Per-output-channel clip logits with group-wise weight scales (a fixed quant.py bug)."""
    weights, x, tmask = layer
    cfg, p, c = _init(weights, x, w_group_size=16)
    out = sl.group_forward(p, c, x, tmask, cfg)
    assert np.all(np.isfinite(np.asarray(out["q"])))
    off = sl.group_forward(p, c, x, tmask, cfg, quantize=False)
    assert _rel(off["q"], sl.dense_forward(weights, x)["q"]) < 2e-6


def test_randomized_svd_for_large_layers_is_near_optimal(monkeypatch):
    """Large layers take a seeded randomized SVD; its rank-r residual is within 1% of the optimum."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((96, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 40)))
    w = ((u * np.exp(-np.arange(40) / 6.0)) @ v.T + 1e-3 * rng.standard_normal((96, 64))).astype(np.float32)
    monkeypatch.setattr(sl, "_EXACT_SVD_MAX", 8)
    ur, l2 = sl._svd_top(w, 5)
    ur2, l22 = sl._svd_top(w, 5)
    np.testing.assert_array_equal(ur, ur2)  # deterministic
    s = np.linalg.svd(w.T.astype(np.float64), compute_uv=False)
    best = np.sqrt(np.sum(s[5:] ** 2))
    assert np.linalg.norm(w.T - ur @ l2) <= 1.01 * best
    np.testing.assert_allclose(ur.T @ ur, np.eye(5), atol=1e-5)
