"""The calibration engine's streaming statistics against numpy references written from their
definitions, and the block statistics pass against the pooled (every token at once) computation."""

import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax import calibrate as cal
from splitq_jax.methods.splitq import mocd
from splitq_jax.calib import collectors as col
from splitq_jax.calib.stats import collect_group_stats, group_inputs_jit, Selection
from splitq_jax.config import method_config
from splitq_jax.modality import ANSWER, PAD, TEXT, VISION
from test_calibrate import BCFG, data  # noqa: F401  (the tiny block and its data, a fixture)


def _batches(rng, n_batches=3, t=40, d=6, paired=False):
    out = []
    for _ in range(n_batches):
        x = rng.normal(size=(t, d)).astype(np.float32) * rng.uniform(0.5, 4, size=d).astype(np.float32)
        mod = rng.choice([PAD, TEXT, VISION, ANSWER], size=t).astype(np.int32)
        x[mod == PAD] = np.nan  # pads may hold anything: no statistic may read them
        w = np.where(mod == PAD, 0.0, rng.uniform(0.1, 2.0, size=t)).astype(np.float32)
        xq = (x + rng.normal(size=x.shape).astype(np.float32) * 0.1) if paired else None
        out.append((x, mod, w, xq))
    return out


def _run(names, batches):
    return col.run(({"g": col.Tokens(jnp.asarray(x), jnp.asarray(m), jnp.asarray(w),
                                     None if xq is None else jnp.asarray(xq))} for x, m, w, xq in batches),
                   {"g": tuple(names)})["g"]


def test_collectors_match_numpy_definitions():
    rng = np.random.default_rng(0)
    batches = _batches(rng, paired=True)
    got = _run(("absmax", "hessian", "cross", "modality_diag"), batches)
    x = np.concatenate([b[0] for b in batches]).astype(np.float64)
    xq = np.concatenate([b[3] for b in batches]).astype(np.float64)
    mod = np.concatenate([b[1] for b in batches])
    w = np.concatenate([b[2] for b in batches]).astype(np.float64)
    v = mod != PAD
    np.testing.assert_array_equal(got["absmax"].absmax, np.max(np.abs(x[v]), 0).astype(np.float32))
    np.testing.assert_allclose(got["absmax"].abssum, np.abs(x[v]).sum(0), rtol=1e-5)
    assert got["absmax"].count == v.sum()
    h = (x[v] * w[v, None]).T @ x[v]  # sum_t w_t x_t x_t^T
    np.testing.assert_allclose(got["hessian"].matrix, h, rtol=1e-5, atol=1e-5 * np.abs(h).max())
    np.testing.assert_allclose(got["hessian"].weight_sum, w.sum(), rtol=1e-6)
    dref = ((x[v] - xq[v]) * w[v, None]).T @ xq[v]  # sum_t w_t (x_fp - x_q)_t x_q,t^T
    np.testing.assert_allclose(got["cross"].matrix, dref, rtol=1e-4, atol=1e-5 * np.abs(dref).max())
    is_t = (mod == TEXT) | (mod == ANSWER)
    np.testing.assert_allclose(got["modality_diag"].vision, (x[mod == VISION] ** 2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(got["modality_diag"].text, (x[is_t] ** 2).sum(0), rtol=1e-5)
    assert (got["modality_diag"].n_vision, got["modality_diag"].n_text) == ((mod == VISION).sum(), is_t.sum())
    assert all(np.all(np.isfinite(a)) for r in got.values() for a in r)


def test_hessian_is_symmetric_psd_and_streaming_is_batch_invariant():
    rng = np.random.default_rng(1)
    batches = _batches(rng, n_batches=4)
    h4 = _run(("hessian",), batches)["hessian"].matrix
    merged = [tuple(np.concatenate([b[i] for b in batches]) if i < 3 else None for i in range(4))]
    h1 = _run(("hessian",), merged)["hessian"].matrix
    np.testing.assert_allclose(h4, h1, rtol=1e-5, atol=1e-6 * np.abs(h1).max())
    np.testing.assert_allclose(h4, h4.T, rtol=1e-6, atol=1e-6 * np.abs(h4).max())
    assert np.linalg.eigvalsh(h4.astype(np.float64)).min() > -1e-4 * np.abs(h4).max()


def test_bad_statistic_and_unpaired_cross_are_refused():
    with pytest.raises(ValueError, match="unknown statistic 'nope'"):
        col.get_collector("nope")
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="paired captures"):
        _run(("cross",), _batches(rng, n_batches=1))


def test_statistics_pass_equals_pooled_reference(data):  # noqa: F811
    """Streamed over batches of 3, the pass finds the absmax and the MOCD channels that the
    pooled computation (every token of every sample at once, select_channels) finds."""
    params, d = data
    cfg = method_config("splitq", "w4a4")
    wanted, split = cal.engine_statistics(cfg, BCFG)
    assert set(split) == {"attn_in", "mlp_in", "mlp_out"} and all(w == ("absmax",) for w in wanted.values())
    stats = collect_group_stats(params, d, BCFG, wanted, split, batch_size=3)
    # the same captures (a batch shape compiles to its own program: round-off may differ)
    caps = [group_inputs_jit(BCFG)(params, *(a[i:i + 3] for a in (d.x, d.cos, d.sin, d.mask)))
            for i in range(0, d.x.shape[0], 3)]
    mod = np.asarray(d.modality).reshape(-1)
    for g in BCFG.groups:
        xs = np.concatenate([np.asarray(c[g]).reshape(-1, c[g].shape[-1]) for c in caps])
        np.testing.assert_array_equal(np.asarray(stats[g].absmax), np.max(np.abs(xs[mod != PAD]), 0))
        if g in split:
            k_t, k_v = mocd.channel_counts(xs.shape[-1], cfg.text_ratio, cfg.vision_ratio)
            ref = mocd.select_channels(xs, mod, k_t=k_t, k_v=k_v, seed=cfg.seed, kmeans_starts=cfg.kmeans_starts)
            np.testing.assert_array_equal(stats[g].text_idx, np.asarray(ref.text))
            np.testing.assert_array_equal(stats[g].vision_idx, np.asarray(ref.vision))
        else:
            assert stats[g].text_idx.size == stats[g].vision_idx.size == 0


def test_methods_collect_only_what_they_read(data):  # noqa: F811
    """RTN reads no statistic; SmoothQuant only the maxima of the inputs a norm feeds."""
    wanted, split = cal.engine_statistics(method_config("rtn"), BCFG)
    assert not split and not any(wanted.values())
    wanted, split = cal.engine_statistics(method_config("smoothquant"), BCFG)
    assert not split and {g for g, w in wanted.items() if w} == {"attn_in", "mlp_in"}
    params, d = data
    stats = cal.collect_stats(params, d, method_config("rtn"), BCFG)
    assert all(s.absmax is None and not s.collected for s in stats.values())


def test_token_weights_in_block_data(data):  # noqa: F811
    """Per-token weights of the block data multiply the loss weights: all-ones weights give the
    same loss, zero weight on a token removes it from the loss and from weighted statistics."""
    params, d = data
    cfg = method_config("rtn", "w4a4")
    r = cal.fit_block(params, d, cfg, BCFG)
    ones = d._replace(weight=jnp.where(d.modality != PAD, 1.0, 0.0))
    assert cal.evaluate(r.qparams, r.qconsts, ones, cfg, BCFG) == cal.evaluate(r.qparams, r.qconsts, d, cfg, BCFG)
    only_vision = d._replace(weight=(d.modality == VISION).astype(jnp.float32))
    vision_only_cfg = cfg.replace(loss_text_weight=0.0)
    assert np.isclose(cal.evaluate(r.qparams, r.qconsts, only_vision, cfg, BCFG),
                      cal.evaluate(r.qparams, r.qconsts, d, vision_only_cfg, BCFG), rtol=1e-6)
    st = collect_group_stats(params, only_vision, BCFG, {"attn_in": ("hessian",)}, batch_size=4)
    cap = np.asarray(group_inputs_jit(BCFG)(params, d.x, d.cos, d.sin, d.mask)["attn_in"]).reshape(-1, BCFG.hidden)
    xv = cap[np.asarray(d.modality).reshape(-1) == VISION].astype(np.float64)
    h = st["attn_in"].collected["hessian"].matrix
    np.testing.assert_allclose(h, xv.T @ xv, rtol=1e-4, atol=1e-5 * np.abs(h).max())
    with pytest.raises(ValueError, match="per-token weights"):
        cal.make_block_data(params, d.x, d.cos, d.sin, d.mask, d.modality, BCFG, weight=-jnp.ones(d.modality.shape))


def test_selection_defaults_match_the_engine():
    """calib.Selection's defaults are MOCD's defaults in the method config (one source of truth
    would be better; this pins them together until then)."""
    cfg = method_config("splitq")
    sel = Selection(cfg.text_ratio, cfg.vision_ratio)
    assert (sel.selector, sel.n_clusters, sel.instability, sel.empty_cluster, sel.kmeans_starts, sel.text_tokens) == (
        cfg.selector, cfg.n_clusters, cfg.instability, cfg.empty_cluster, cfg.kmeans_starts, cfg.text_tokens)
