"""AWQ: the scale and clip searches against numpy, the exact fold of the scales, alpha = 0 as
round-to-nearest, and the folded checkpoint against its fake-quant calibration."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import splitq_jax.methods as methods
from splitq_jax import quantize as qz
from splitq_jax.block import BlockConfig, fp_block, init_block_params
from splitq_jax.config import ConfigError
from splitq_jax.methods import plain
from splitq_jax.methods.awq import method as am
from splitq_jax.methods.awq import search
from splitq_jax.quant import fake_quant
from splitq_jax.quantized import fold
from splitq_jax.quantized.group import WeightSpec
from splitq_jax.quantized.schema import InferenceSpec, validate_folded_block
from splitq_jax.runtime import load_quantized
from test_calibrate import BCFG, data  # noqa: F401  (data: a module fixture)
from test_cli import assert_runtime_matches_fake_quant, tiny  # noqa: F401  (tiny: a module fixture)

# Every head has its own value head: v_proj -> o_proj is a scale group too.
MHA = BlockConfig(hidden=48, intermediate=96, num_heads=4, num_kv_heads=4)


def _rtn_np(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Asymmetric round-to-nearest per row and group of ``group`` columns, from the equations:
    the range widened to contain 0, ``scale = (max - min) / (2^b - 1)``, ``z = round(-min / scale)``."""
    o, d = w.shape
    wg = w.reshape(o, d // group, group)
    hi = np.maximum(wg.max(-1, keepdims=True), 0.0)
    lo = np.minimum(wg.min(-1, keepdims=True), 0.0)
    scale = np.maximum((hi - lo) / (2 ** bits - 1), 1e-30)
    z = np.round(-lo / scale)
    q = np.clip(np.round(wg / scale) + z, 0, 2 ** bits - 1)
    return ((q - z) * scale).reshape(o, d)


def test_scale_groups_and_their_fold_are_exact(data):  # noqa: F811
    """Folding any positive scales (columns times s, the producing norm or linear rows divided by
    s) leaves the full-precision block unchanged; v_proj -> o_proj is a scale group only when every
    query head has its own value head."""
    _, d = data
    assert [sg.group for sg in search.scale_groups(BCFG)] == ["attn_in", "mlp_in", "mlp_out"]
    assert [sg.group for sg in search.scale_groups(MHA)] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    for i, bcfg in enumerate((BCFG, MHA)):
        params = init_block_params(jax.random.PRNGKey(10 + i), bcfg, scale=0.15)
        keys = jax.random.split(jax.random.PRNGKey(20 + i), 4)
        scales = {sg.group: jnp.exp(jax.random.normal(k, (params[bcfg.groups[sg.group][0]]["w"].shape[1],)))
                  for k, sg in zip(keys, search.scale_groups(bcfg))}
        want = fp_block(params, d.x, d.cos, d.sin, d.mask, bcfg)
        got = fp_block(am.apply_scales(params, scales, bcfg), d.x, d.cos, d.sin, d.mask, bcfg)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("loss", ["mse", "mae"])
def test_scale_search_scores_each_alpha_as_numpy_does(data, loss):  # noqa: F811
    """The down_proj group (inspected on its own output): every candidate's loss is numpy's
    ``sum_t w_t sum_c f(Q(W s) (x_t / s) - W x_t) / (sum_t w_t * d_out)`` over the non-pad tokens with
    ``s = mean|x|^alpha / sqrt(max * min)``, and the search keeps numpy's best alpha."""
    params, d = data
    cfg = methods.get_config("awq", "w3a16", w_group_size=16, search_loss=loss, batch_size=3)
    sg = next(s for s in search.scale_groups(BCFG) if s.group == "mlp_out")
    x_in = np.asarray(search.inputs_jit(BCFG, cfg)(params, {}, d.x, d.cos, d.sin, d.mask)["mlp_out"], np.float64)
    valid = np.asarray(d.modality) != 0
    x = x_in[valid]
    w = np.asarray(params["down_proj"]["w"], np.float64)
    x_mean = np.abs(x).mean(0)
    ref = []
    for alpha in cfg.alphas:
        s = np.maximum(x_mean ** alpha, 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        dlt = (x / s) @ _rtn_np(w * s, 3, 16).T - x @ w.T
        ref.append((np.abs(dlt) if loss == "mae" else dlt ** 2).sum() / (len(x) * w.shape[0]))
    ref = np.array(ref)
    s, alpha, losses = am.search_scale(params, {}, d, cfg, BCFG, sg, jnp.asarray(x_mean, jnp.float32),
                                       (d.modality != 0).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=2e-4)
    assert alpha == cfg.alphas[int(np.argmin(ref))]
    assert np.sort(ref)[1] > np.min(ref) * 1.001  # a clear winner: the check above is not a tie
    assert alpha > 0 and float(jnp.max(s) * jnp.min(s)) == pytest.approx(1.0, rel=1e-5)


def test_clip_search_picks_numpy_ratio_per_row_and_group():
    """Per row and group: the ratio whose clamp then round-to-nearest has the least mean squared
    partial dot product error on the tokens (numpy brute force). The rounding itself is the
    library's: the clamp is symmetric, so when it cuts both ends the asymmetric grid's zero point
    ``-min / scale = (2^b - 1) / 2`` sits exactly on a rounding tie that float round-off decides."""
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, size=(6, 32)).astype(np.float32)  # heavy tails: clipping pays off somewhere
    x = rng.normal(size=(40, 32)).astype(np.float32)
    ratios = tuple(1.0 - i / 20 for i in range(10))
    got = np.asarray(search.clip_search(jnp.asarray(w), jnp.asarray(x), bits=3, symmetric=False, group_size=16,
                                        ratios=ratios))
    want = np.ones((6, 2))
    for r_i in range(6):
        for g in range(2):
            cols = slice(16 * g, 16 * g + 16)
            wr, xr = w[r_i, cols].astype(np.float64), x[:, cols].astype(np.float64)
            m = np.abs(wr).max()
            rounded = [np.asarray(fake_quant(jnp.asarray(np.clip(wr, -m * r, m * r), jnp.float32), 3, symmetric=False),
                                  np.float64) for r in ratios]
            errs = [np.mean((xr @ (q - wr)) ** 2) for q in rounded]
            want[r_i, g] = ratios[int(np.argmin(errs))]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (want < 1).any() and (want == 1).any()


def test_alpha_zero_without_clip_is_round_to_nearest(data):  # noqa: F811
    """A grid of alpha = 0 alone gives s = 1 exactly: with the clip search off, AWQ stores the very
    codes of round-to-nearest and reports the same loss before and after."""
    params, d = data
    cfg = methods.get_config("awq", "w4a16", w_group_size=16, n_grid=1, clip_search=False)
    r = methods.calibrate_block(params, d, cfg, BCFG)
    folded = methods.fold_block(r, cfg, BCFG)
    for g, names in BCFG.groups.items():
        for n in names:
            want = fold.pack_weight(WeightSpec(params[n]["w"], 4, None, 16), symmetric=False)
            got = folded["groups"][g]["weights"][n]["main"]
            same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), got, want)
            assert all(jax.tree_util.tree_leaves(same))
    assert r.final_loss == r.init_loss


# The plain weight-only case is also the export test's (tests/test_export_hf.py: transformers runs it).
@pytest.mark.parametrize("bcfg,bits,opts", [
    pytest.param(BCFG, "w4a16", dict(w_group_size=16), marks=pytest.mark.slow),
    (MHA, "w3a16", dict(w_group_size=16, block_inputs="quantized", duo_scaling=True)),
    (BCFG, "w4a8", dict()),
])
def test_folded_block_computes_the_calibrated_block(data, bcfg, bits, opts):  # noqa: F811
    """The folded block (plain packed weights, the scales inside the norms and linears) follows the
    stored schema and computes the block whose loss AWQ reported, and that loss is below
    round-to-nearest's. With activations quantized, a token whose activation sits on a rounding
    tie may round the other way in the runtime: at most one token in 50 differs."""
    _, d = data
    params = init_block_params(jax.random.PRNGKey(5), bcfg, scale=0.15)
    if opts.get("block_inputs") == "quantized":
        d = d._replace(x_fp=d.x, x=d.x + 0.02 * jax.random.normal(jax.random.PRNGKey(3), d.x.shape))
        d = d._replace(y=fp_block(params, d.x_fp, d.cos, d.sin, d.mask, bcfg))
    else:
        d = d._replace(y=fp_block(params, d.x, d.cos, d.sin, d.mask, bcfg))
    cfg = methods.get_config("awq", bits, **opts)
    r = methods.calibrate_block(params, d, cfg, bcfg)
    folded = methods.fold_block(r, cfg, bcfg)
    spec = InferenceSpec.of(cfg)
    validate_folded_block(folded, spec)
    assert all(f["acts"]["transform"] is None for f in folded["groups"].values())
    qw = {g: {n: fake_quant(w, cfg.w_bits, symmetric=cfg.w_symmetric, group_size=cfg.w_group_size)
              for n, w in ws.items()} for g, ws in r.qparams["weights"].items()}
    biases = {n: {"w": None, "b": b} for bs in r.qconsts["biases"].values() for n, b in bs.items()}
    state = {**r.qconsts["norms"], **biases}
    _, want = plain.capture_jit(bcfg, cfg.a_bits, cfg.a_symmetric)(state, qw, d.x, d.cos, d.sin, d.mask)
    got = fold.folded_block_forward(folded, d.x, d.cos, d.sin, d.mask, d.modality, spec, bcfg)
    valid = np.asarray(d.modality) != 0
    err = np.abs(np.asarray(got) - np.asarray(want)).max(-1)[valid] / np.abs(np.asarray(want)).max()
    if cfg.a_bits is None:
        assert err.max() <= 1e-5
    else:
        assert (err > 1e-5).mean() <= 0.02
    assert r.final_loss < r.init_loss


def test_unfoldable_scale_is_refused_naming_the_shapes(data):  # noqa: F811
    """A block whose producer of a scaled group's input has the wrong width is refused, naming
    the group, the producer and the shapes."""
    params, d = data
    bad = {**params, "up_proj": {"w": params["up_proj"]["w"][:-8]}}
    with pytest.raises(search.ScaleFoldError, match=r"mlp_out \(96 input channels\) cannot be folded into linear up_proj"):
        methods.calibrate_block(bad, d, methods.get_config("awq", "w4a16", w_group_size=16), BCFG)


def test_defaults_and_bad_settings_name_the_fix():
    """AWQ is weight-only W4 g128 asymmetric by default; with activations quantized its weights are
    per-channel symmetric; bad options are errors naming the flag."""
    cfg = methods.get_config("awq")
    assert (cfg.bits, cfg.w_group_size, cfg.w_symmetric, cfg.clip_search, cfg.n_grid) == ("w4a16", 128, False, True, 20)
    cfg = methods.get_config("awq", "w4a8")
    assert (cfg.w_group_size, cfg.w_symmetric, cfg.a_symmetric) == (None, True, True)
    assert cfg.clip_ratios == tuple(1.0 - i / 20 for i in range(10))
    for opts, flag in ((dict(n_grid=0), "n_grid"), (dict(search_loss="l3"), "--search-loss"),
                       (dict(block_inputs="both"), "--block-inputs"), (dict(max_shrink=1.5), "max_shrink")):
        with pytest.raises(ConfigError, match=flag):
            methods.get_config("awq", "w4a16", **opts)
    with pytest.raises(ConfigError, match="weight bit width"):
        methods.get_config("awq", "w16a8")


@pytest.mark.slow  # the whole-model path of the scale search is also MBQ's (test_gradient_methods) and the export's
def test_whole_model_checkpoint_runs_in_the_runtime(tiny, tmp_path):  # noqa: F811
    """The whole-model run on the tiny LLaVA at W4A8: the checkpoint exports, loads, holds no
    transform, and its integer runtime computes the fake-quant model's logits."""
    handle, batches, stream = tiny["llava"]
    cfg = methods.get_config("awq", "w4a8", batch_size=2)
    path, result = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"})
    assert all(b.final_loss < b.init_loss for b in result.reports)
    qm = load_quantized(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["method"], manifest["bits"], qm.spec.a_bits) == ("awq", "w4a8", 8)
    got = assert_runtime_matches_fake_quant(qm, batches[0])
    assert np.all(np.isfinite(got))
