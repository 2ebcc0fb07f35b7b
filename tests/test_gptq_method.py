"""GPTQ, GPTAQ and VLM-PTQ on the method seam: statistics, the fold, the whole-model run and the
runtime on weight-only checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import splitq_jax.methods as methods
from splitq_jax import quantize as qz
from splitq_jax.calib.stats import group_inputs_jit
from splitq_jax.config import ConfigError
from splitq_jax.methods import plain
from splitq_jax.methods.gptq import method as gm
from splitq_jax.quantized import fold
from splitq_jax.quantized.schema import InferenceSpec, validate_folded_block
from splitq_jax.runtime import load_quantized
from test_calibrate import BCFG, data  # noqa: F401  (data: a module fixture)
from test_cli import assert_runtime_matches_fake_quant, tiny  # noqa: F401  (tiny: a module fixture)


def test_hessian_is_the_sum_over_valid_tokens(data):  # noqa: F811
    """The Hessian of a group input is ``sum_t x_t x_t^T`` over the non-pad tokens of the
    full-precision block (no group quantized, activations unquantized), against numpy."""
    params, d = data
    cfg = methods.get_config("gptq", "w4a16", w_group_size=None, batch_size=3)
    st = gm._statistics(params, d, cfg, BCFG, {}, tuple(BCFG.groups))
    cap = group_inputs_jit(BCFG)(params, d.x, d.cos, d.sin, d.mask)
    valid = np.asarray(d.modality) != 0
    for g in BCFG.groups:
        x = np.asarray(cap[g], np.float64)[valid]
        np.testing.assert_allclose(np.asarray(st[g]["hessian"].matrix), x.T @ x, rtol=2e-5,
                                   atol=2e-5 * np.abs(x.T @ x).max())
        assert float(st[g]["hessian"].weight_sum) == valid.sum()


def test_gptaq_with_equal_paths_is_gptq(data):  # noqa: F811
    """With equal block inputs on both paths and every group's statistics taken before any is
    quantized (no true-sequential order), the cross term is exactly zero, so GPTAQ folds to
    GPTQ's very bits. (In true-sequential order the paths part after q/k/v are quantized.)"""
    params, d = data
    paired = d._replace(x_fp=d.x)
    opts = dict(w_group_size=None, true_sequential=False)
    ref = methods.fold_block(methods.calibrate_block(params, d, methods.get_config("gptq", "w3a16", **opts), BCFG),
                             methods.get_config("gptq", "w3a16", **opts), BCFG)
    cfg = methods.get_config("gptaq", "w3a16", **opts)
    got = methods.fold_block(methods.calibrate_block(params, paired, cfg, BCFG), cfg, BCFG)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), got, ref)
    assert all(jax.tree_util.tree_leaves(same))


@pytest.mark.parametrize("name,bits,opts", [
    ("gptq", "w4a8", dict(w_group_size=None, true_sequential=False)),
    ("vlm-ptq", "w3a16", dict(w_group_size=16)),
])
def test_folded_block_computes_the_calibrated_block(data, name, bits, opts):  # noqa: F811
    """The folded block (plain packed weights: no transform, no channel split) follows the stored
    schema and computes what the method calibrated, and the solve lowers the block error below
    round-to-nearest's on the same grid."""
    params, d = data
    d = d._replace(x_fp=d.x, x=d.x + 0.02 * jax.random.normal(jax.random.PRNGKey(3), d.x.shape))
    cfg = methods.get_config(name, bits, **opts)
    r = methods.calibrate_block(params, d, cfg, BCFG)
    folded = methods.fold_block(r, cfg, BCFG)
    spec = InferenceSpec.of(cfg)
    validate_folded_block(folded, spec)
    assert all(f["acts"]["transform"] is None and f["split"]["main_mask"] is None for f in folded["groups"].values())
    qweights = {g: {n: s.weight for n, s in sols.items()} for g, sols in r.qparams.items()}
    _, want = plain.capture_jit(BCFG, cfg.a_bits, cfg.a_symmetric)(params, qweights, d.x, d.cos, d.sin, d.mask)
    got = fold.folded_block_forward(folded, d.x, d.cos, d.sin, d.mask, d.modality, spec, BCFG)
    valid = np.asarray(d.modality) != 0
    err = np.abs(np.asarray(got) - np.asarray(want))[valid]
    assert err.max() <= 1e-5 * np.abs(np.asarray(want)).max()
    assert r.final_loss < r.init_loss


def test_mu_search_picks_the_candidate_numpy_scores_best():
    """VLM-PTQ's modality search: for each ``mu`` the grid weighted by ``mu * mean_v x^2 + (1 - mu) *
    mean_t x^2`` (channel means written here in numpy), rounded to nearest; the winner is the one
    whose output error against the full-precision path, ``||W X~ - W^ X||^2`` summed over the tokens
    in numpy, is least, and the solve runs on its grid. The statistics' form of that error differs
    from numpy's by the same constant ``||W X~||^2`` for every candidate."""
    import types

    from splitq_jax.methods.gptq import solver

    rng = np.random.default_rng(5)
    o, d, n = 8, 32, 300
    x = rng.normal(size=(n, d)) * rng.uniform(0.3, 2.0, size=d)
    vision = rng.random(n) < 0.4
    x[vision, :4] *= 10.0  # each modality has its own outlier channels
    x[~vision, 4:8] *= 10.0
    x_fp = x + 0.1 * rng.normal(size=x.shape)
    w = rng.normal(size=(o, d))
    h, dc = x.T @ x, (x_fp - x).T @ x
    diag = types.SimpleNamespace(vision=(x[vision] ** 2).sum(0), text=(x[~vision] ** 2).sum(0),
                                 n_vision=int(vision.sum()), n_text=int((~vision).sum()))
    st = {"hessian": types.SimpleNamespace(matrix=h), "cross": types.SimpleNamespace(matrix=dc),
          "modality_diag": diag}
    cfg = methods.get_config("vlm-ptq", "w3a16", w_group_size=16)
    w32 = jnp.asarray(w, jnp.float32)
    grids, numpy_err, lib_err = {}, {}, {}
    for mu in cfg.mus:
        m = mu * (x[vision] ** 2).mean(0) + (1 - mu) * (x[~vision] ** 2).mean(0)
        grids[mu] = solver.fit_static_grid(w32, 3, True, 16, importance=jnp.asarray(m, jnp.float32))
        w_hat = np.asarray(gm._dequantize_rtn(w32, grids[mu], cfg), np.float64)
        numpy_err[mu] = float(np.sum((x_fp @ w.T - x @ w_hat.T) ** 2))
        lib_err[mu] = float(solver.output_error(w32, jnp.asarray(w_hat, jnp.float32), jnp.asarray(h, jnp.float32),
                                                jnp.asarray(dc, jnp.float32)))
    const = float(np.sum((x_fp @ w.T) ** 2))
    for mu in cfg.mus:
        assert lib_err[mu] + const == pytest.approx(numpy_err[mu], rel=1e-4)
    best = min(numpy_err, key=numpy_err.get)
    assert len({round(v, 3) for v in numpy_err.values()}) > 1  # the candidates really differ
    sol = gm._solve_linear(w32, {k: (types.SimpleNamespace(matrix=jnp.asarray(v.matrix, jnp.float32))
                                     if k != "modality_diag" else v) for k, v in st.items()}, cfg)
    np.testing.assert_array_equal(np.asarray(sol.grid.scale), np.asarray(grids[best].scale))


def test_bad_settings_name_the_fix():
    with pytest.raises(ConfigError, match="needs --static-groups"):
        methods.get_config("gptq", "w4a16", w_group_size=16, act_order=True)
    with pytest.raises(ConfigError, match="give a weight bit width"):
        methods.get_config("gptq", "w16a8")
    with pytest.raises(ConfigError, match="mu_grid"):
        methods.get_config("vlm-ptq", "w3a16", mu_grid="0,2")
    with pytest.raises(ConfigError, match="must be 'quantized'"):
        methods.get_config("gptaq", "w4a16", block_inputs="fp")
    for bad, flag in ((dict(damp=2.0), "damp"), (dict(block_size=0), "block_size"), (dict(alpha=-1.0), "alpha"),
                      (dict(outer_update="later"), "outer_update")):
        with pytest.raises(ConfigError, match=flag):
            methods.get_config("gptaq", "w4a16", **bad)
    with pytest.raises(ConfigError, match="cws_ratio"):
        methods.get_config("gptq", "w4a16", cws_ratio=0.1)
    assert methods.get_config("gptq", "w3a16").w_group_size == 128  # 2/3-bit weight-only: groups of 128


# ~17 s; test_export_hf's gptq w3a16 case runs a GPTQ checkpoint in the runtime against transformers
@pytest.mark.slow
def test_weight_only_checkpoint_runs_in_the_runtime(tiny, tmp_path):  # noqa: F811
    """The whole-model run: a GPTQ W4A16 checkpoint of the tiny Qwen2.5-VL, vision tower included
    (its quantized output is what the language blocks calibrate on: GPTQ's quantized block inputs),
    exports, loads, and its integer runtime (activations unquantized) computes the fake-quant
    model's logits."""
    from splitq_jax import vision_block as vb

    handle, batches, stream = tiny["qwen2_5_vl"]
    cfg = methods.get_config("gptq", "w4a16", w_group_size=16, batch_size=2)
    path, result = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"},
                                     vision=qz.vision_job(handle, batches, cfg))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["method"] == "gptq" and manifest["bits"] == "w4a16"
    assert manifest["vision"]["num_blocks"] == vb.num_quantized_blocks(handle.model.config, "qwen2_5_vl")
    assert all(b["final_loss"] < b["init_loss"] for b in manifest["vision_block_reports"])
    assert all(b["final_loss"] < b["init_loss"] for b in manifest["blocks"])
    qm = load_quantized(path)
    assert qm.spec.a_bits is None
    got = assert_runtime_matches_fake_quant(qm, batches[0])
    assert np.all(np.isfinite(got))
    assert jnp.asarray(got).shape[-1] == handle.model.config.text.vocab_size


def test_cli_refuses_bad_gptq_options_before_writing(tmp_path, capsys):
    """A group size that divides no layer width, or an option of another method: exit 2, a message
    naming the fix, nothing written."""
    from test_cli import run_cli

    for argv, message in ((["--w-group-size", "7"], "--w-group-size 7 does not divide"),
                          (["--alpha", "0.3"], "--alpha is an option of gptaq, vlm-ptq")):
        rc, err = run_cli(["--method", "gptq", "--bits", "w4a16", *argv, "--out", tmp_path / "ckpt"], capsys)
        assert rc == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []
