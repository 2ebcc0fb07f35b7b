"""MBQ and TLQ, the methods of the whole-model gradient pass: the layer ratios on planted cases,
the pass's fallbacks and errors, MBQ's search weights, MBQ without reweighting as AWQ, TLQ's
token-level set and weighted Hessian, and the resumable whole-model runs."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import splitq_jax.methods as methods
from splitq_jax import quantize as qz
from splitq_jax.calib import gradients as gr
from splitq_jax.errors import NonFiniteError
from splitq_jax.methods.awq import mbq, search
from splitq_jax.modality import ANSWER, TEXT, VISION
from test_calibrate import BCFG, data  # noqa: F401  (data: a module fixture)
from test_cli import tiny  # noqa: F401  (tiny: a module fixture)


def _blind_to_vision(stream):
    """The stream with every query but the vision tokens themselves barred from vision keys."""
    vis = np.asarray(stream.modality) == VISION
    mask = np.asarray(stream.mask) & ~(vis[:, None, :] & ~vis[:, :, None])
    return dataclasses.replace(stream, mask=jnp.asarray(mask))


def test_layer_ratios_on_planted_cases(tiny):  # noqa: F811
    """A model whose answers cannot see the vision tokens gets ratio 0 in every layer. In the
    unmodified model the last layer's vision outputs reach no answer either (each position's
    output feeds only its own logits), so its raw ratio is exactly 0 while an earlier layer's is
    not, and the median floor lifts it."""
    handle, _, stream = tiny["qwen2_5_vl"]
    modality = np.asarray(stream.modality)
    blind = gr.gradient_pass(handle.model, _blind_to_vision(stream))
    assert np.all(gr.layer_ratios(blind, modality) == 0)
    assert np.all(gr.modality_ratios(blind, modality)[0] == 0)
    full = gr.gradient_pass(handle.model, stream)
    raw = gr.layer_ratios(full, modality)
    assert np.all(raw[-1] == 0) and np.all(raw[0] > 0)
    floored, note = gr.modality_ratios(full, modality)
    assert note is None
    np.testing.assert_allclose(floored, np.maximum(raw, np.median(raw, axis=0)), rtol=1e-6)
    assert np.all(floored[-1] > 0)
    predicts = np.zeros_like(modality, bool)
    predicts[:, :-1] = modality[:, 1:] == ANSWER  # the positions whose outputs predict an answer
    assert full.fallback is None and np.array_equal(full.answer, predicts) and predicts.any()
    assert np.all(np.moveaxis(full.magnitudes, -1, 1)[modality == 0] == 0)  # pads carry nothing


def test_fallbacks_and_a_non_finite_sample_named(tiny):  # noqa: F811
    """Without answer tokens every text token is an answer (said so); without vision tokens the
    vision weight is 1 and unused (said so); a sample that overflows is named."""
    handle, _, stream = tiny["qwen2_5_vl"]
    modality = np.asarray(stream.modality)
    plain_text = dataclasses.replace(stream, modality=jnp.asarray(np.where(modality == ANSWER, TEXT, modality)))
    r = gr.gradient_pass(handle.model, plain_text)
    predicts = np.zeros_like(modality, bool)
    predicts[:, :-1] = np.isin(modality[:, 1:], (TEXT, ANSWER)) & (modality[:, :-1] != 0)
    assert "no answer tokens" in r.fallback and np.array_equal(r.answer, predicts)
    weights, note = gr.modality_ratios(r, np.where(modality == VISION, TEXT, modality))
    assert "no vision tokens" in note and np.all(weights == 1)
    x = np.asarray(stream.x).copy()
    x[2, 3] = np.inf
    with pytest.raises(NonFiniteError, match="calibration sample 2"):
        gr.gradient_pass(handle.model, dataclasses.replace(stream, x=jnp.asarray(x)))


def test_search_weights_answers_one_vision_rho(data):  # noqa: F811
    """MAE: answers weigh 1, vision tokens the layer's rho (attention's for attention groups, the
    MLP's for MLP groups), everything else 0; MSE: per-modality means; no context: AWQ's."""
    _, d = data
    modality = np.asarray(d.modality).copy()
    modality[:, -4:] = np.where(modality[:, -4:] == 0, 0, ANSWER)
    d = d._replace(modality=jnp.asarray(modality))
    answer, vision = modality == ANSWER, modality == VISION
    context = {"attn": 0.25, "mlp": 0.5, "answer": jnp.asarray(answer)}
    mae, mse = methods.get_config("mbq", "w3a16"), methods.get_config("mbq", "w3a16", search_loss="mse")
    for sg in search.scale_groups(BCFG):
        rho = 0.25 if sg.group.startswith("attn") else 0.5
        np.testing.assert_array_equal(np.asarray(mbq.MBQ.token_weights(d, mae, sg, context)),
                                      answer + rho * vision)
        np.testing.assert_allclose(np.asarray(mbq.MBQ.token_weights(d, mse, sg, context)),
                                   answer / answer.sum() + rho * vision / vision.sum(), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(mbq.MBQ.token_weights(d, mae, sg)), modality != 0)


def test_without_reweighting_mse_is_awq_without_clipping(data):  # noqa: F811
    """MBQ with equal token weights and the MSE loss is AWQ without the clip search, bit for bit."""
    params, d = data
    a = methods.get_config("awq", "w3a16", w_group_size=16, clip_search=False)
    m = methods.get_config("mbq", "w3a16", w_group_size=16, reweight=False, search_loss="mse")
    got = methods.fold_block(methods.calibrate_block(params, d, m, BCFG), m, BCFG)
    want = methods.fold_block(methods.calibrate_block(params, d, a, BCFG), a, BCFG)
    import jax

    same = jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), got, want)
    assert all(jax.tree_util.tree_leaves(same))


def test_defaults():
    cfg = methods.get_config("mbq")
    assert (cfg.bits, cfg.w_group_size, cfg.w_symmetric, cfg.search_loss, cfg.clip_search, cfg.reweight) == \
        ("w3a16", 128, False, "mae", False, True)
    cfg = methods.get_config("mbq", "w4a8")
    assert (cfg.w_group_size, cfg.w_symmetric) == (None, True)


def test_whole_model_run_records_ratios_and_resumes_the_pass(tiny, tmp_path, monkeypatch):  # noqa: F811
    """The gradient pass runs once before block 0 and is saved; a run that fails after block 0
    resumes without redoing it (the pass is refused here) and writes the clean run's checkpoint."""
    from splitq_jax.runtime import load_quantized
    from test_cli import assert_trees_identical

    handle, _, stream = tiny["qwen2_5_vl"]
    cfg = methods.get_config("mbq", "w3a16", w_group_size=16, batch_size=2)
    clean, clean_result = qz.quantize_model(handle, stream, cfg, tmp_path / "clean",
                                            data_record={"source": "synthetic"})
    manifest = json.loads((clean / "manifest.json").read_text())
    rec = manifest["model_pass"]
    assert rec["kind"] == "gradients" and len(rec["attention_ratio"]) == len(manifest["blocks"]) == 2
    assert rec["fallbacks"] == [] and all(r > 0 for r in rec["attention_ratio"] + rec["mlp_ratio"])
    with pytest.raises(RuntimeError, match="injected failure"):
        qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"},
                          fail_after_block=0)
    assert (tmp_path / "ckpt.work" / gr.GRADIENTS_FILE).exists()

    def refuse(*a, **kw):
        raise AssertionError("the resumed run recomputed the gradient pass")

    monkeypatch.setattr(gr, "gradient_pass", refuse)
    path, _ = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"},
                                resume=True)
    for i, (a, b) in enumerate(zip(load_quantized(path).blocks, clean_result.folded_blocks, strict=True)):
        assert_trees_identical(a, b, f"block {i}")


def test_tlq_token_set_top_and_resample():
    """``top`` keeps the planted most important tokens (each layer's importance scaled to mean 1
    first, so a layer of large gradients does not decide alone); ``resample`` draws that many
    tokens, only among tokens of some importance; pads never enter."""
    from splitq_jax.methods.gptq import tlq

    valid = np.ones((2, 5), bool)
    valid[1, :2] = False
    imp = np.full((2, 2, 5), 0.01)
    imp[0, 0, 4] = 5.0  # layer 0: token (0, 4)
    imp[1, 1, 3] = 0.5  # layer 1 is ten times smaller overall, yet its top token (1, 3) counts
    imp[:, 1] *= 0.1
    imp[1, 1, 3] = 0.05
    imp[1, :, :2] = 100.0  # pads: never selected
    cfg = methods.get_config("tlq", "w3a16", token_fraction=0.25)
    count = tlq.token_set(imp, valid, cfg)
    assert count.sum() == 2 and count[0, 4] == 1 and count[1, 3] == 1
    imp[0, :, :3] = 0.0
    cfg = methods.get_config("tlq", "w3a16", token_fraction=1.0, token_selection="resample", seed=3)
    count = tlq.token_set(imp, valid, cfg)
    assert count.sum() == valid.sum() and np.all(count[~valid] == 0) and np.all(count[0, :3] == 0)
    w = tlq.layer_weights(imp, count)
    assert all(np.isclose(wl.sum(), count.sum()) and np.all(wl[count == 0] == 0) for wl in w)  # mean 1 over the set


def test_tlq_weighted_hessian_and_uniform_weights_as_gptq(data):  # noqa: F811
    """The statistics under TLQ's token weights are ``sum_t w_t x_t x_t^T`` (numpy); with weight 1
    on every non-pad token TLQ folds to GPTQ's very bits."""
    import jax

    from splitq_jax.calib.stats import group_inputs_jit
    from splitq_jax.methods.gptq import method as gm

    params, d = data
    w = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), d.modality.shape)) * (np.asarray(d.modality) != 0)
    cfg = methods.get_config("tlq", "w4a16", w_group_size=None, batch_size=3)
    st = gm._statistics(params, d._replace(weight=jnp.asarray(w, jnp.float32)), cfg, BCFG, {}, ("attn_in",))
    x = np.asarray(group_inputs_jit(BCFG)(params, d.x, d.cos, d.sin, d.mask)["attn_in"], np.float64)
    want = np.einsum("sn,sni,snj->ij", w, x, x)
    np.testing.assert_allclose(np.asarray(st["attn_in"]["hessian"].matrix), want, rtol=2e-5,
                               atol=2e-5 * np.abs(want).max())
    ones = {"weight": (d.modality != 0).astype(jnp.float32)}
    got = methods.fold_block(methods.calibrate_block(params, d, cfg, BCFG, context=ones), cfg, BCFG)
    g = methods.get_config("gptq", "w4a16", w_group_size=None, batch_size=3)
    ref = methods.fold_block(methods.calibrate_block(params, d, g, BCFG), g, BCFG)
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), got, ref)
    assert all(jax.tree_util.tree_leaves(same))


def test_tlq_whole_model_run_records_its_token_set(tiny, tmp_path):  # noqa: F811
    """The whole-model TLQ run: the gradient pass, a token-level set of half the tokens (the
    record says so), a finite checkpoint. (Its unweighted block loss need not beat round-to-
    nearest's: the solve weighs tokens by importance.)"""
    handle, _, stream = tiny["llava"]
    cfg = methods.get_config("tlq", "w4a16", w_group_size=16, batch_size=2, token_fraction=0.5)
    path, result = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"})
    rec = json.loads((path / "manifest.json").read_text())["model_pass"]
    tokens = int((np.asarray(stream.modality) != 0).sum())
    assert rec["tokens"] == tokens and rec["tokens_in_set"] == round(0.5 * tokens) == rec["distinct_tokens_in_set"]
    assert all(np.isfinite(b.final_loss) for b in result.reports)


def test_cli_refuses_bad_tlq_and_mbq_options_before_writing(tmp_path, capsys):
    """A bad option of the gradient methods: exit 2, a message naming the flag, nothing written."""
    from test_cli import run_cli

    for argv, message in ((["--method", "tlq", "--token-selection", "best"], "--token-selection"),
                          (["--method", "tlq", "--token-fraction", "0"], "--token-fraction"),
                          (["--method", "mbq", "--search-loss", "l1"], "--search-loss")):
        rc, err = run_cli([*argv, "--out", tmp_path / "ckpt"], capsys)
        assert rc == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []
