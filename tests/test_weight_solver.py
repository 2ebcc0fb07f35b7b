"""GPTQ as the weight back end of a transform method (``--weight-solver gptq``): the Hessian of the
folded layer's transformed, activation-quantized input, the identity with the fold's rounding, and
the fold of what was scored."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import splitq_jax.methods as methods
from splitq_jax import quantize as qz
from splitq_jax.config import ConfigError
from splitq_jax.methods.gptq import backend
from splitq_jax.methods.splitq import split_linear as sl
from splitq_jax.quantized import fold
from splitq_jax.quantized.group import Bits
from splitq_jax.quantized.schema import InferenceSpec, validate_folded_block
from splitq_jax.runtime import load_quantized
from test_calibrate import BCFG, data  # noqa: F401  (data: a module fixture)
from test_cli import assert_runtime_matches_fake_quant, run_cli, tiny  # noqa: F401  (tiny: a module fixture)

# Initialised, untrained transforms (random Kronecker factors, smooth diagonals, clipping logits at
# their start): the back end's arithmetic is the same after training, and nothing is compiled twice.
CASES = {
    "flatquant w4a4": ("flatquant", "w4a4", dict(epochs=0)),
    "flatquant w3a16 g16 asym": ("flatquant", "w3a16", dict(epochs=0, w_group_size=16, w_symmetric=False)),
    "splitq w4a4": ("splitq", "w4a4", dict(epochs=0)),
}


def _calibrate(params, d, name, bits, opts, solver_name):
    cfg = methods.get_config(name, bits, weight_solver=solver_name, **opts)
    r = methods.calibrate_block(params, d, cfg, BCFG)
    return cfg, r, methods.fold_block(r, cfg, BCFG)


def _output_error(w, w_hat, h):
    """``tr((W - W^) H (W - W^)^T)``: the layer output error GPTQ minimises."""
    e = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum((e @ np.asarray(h, np.float64)) * e))


# "flatquant w4a4" is slow: the other two cover its parts (a Kronecker transform, activation
# quantization) and more (groups, asymmetry; SplitQ's residual).
# flatquant w3a16 g16 asym stays fast (the solver's fold with groups and zero points); the other
# cases (~20 s each, splitq's split groups) are slow
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in ("flatquant w4a4", "splitq w4a4")
                                  else c for c in CASES])
def test_the_fold_computes_the_scored_block_and_gptq_lowers_the_layer_error(data, case):  # noqa: F811
    """The folded checkpoint block (schema-valid) computes the block the back end scored; every
    group's summed output error ``||(W - W^) X||^2`` under the captured Hessian is below the fold's
    round-to-nearest (on the same clipped grid), and the block loss is no higher than it."""
    params, d = data
    name, bits, opts = CASES[case]
    cfg, r, folded = _calibrate(params, d, name, bits, opts, "gptq")
    _, r_rtn, _ = _calibrate(params, d, name, bits, opts, "rtn")
    spec = InferenceSpec.of(cfg)
    folded = fold.canonicalize(folded, BCFG.group_norm, spec.main_path)
    validate_folded_block(folded, spec)
    engine = cfg.engine_config()
    mains = {g: {n: s.weight for n, s in sols.items()} for g, sols in r.solved.items()}
    seen, want = backend._capture_jit(engine, BCFG)(r.qparams, r.qconsts, mains, d.x, d.cos, d.sin, d.mask,
                                                   d.modality)
    got = fold.folded_block_forward(folded, d.x, d.cos, d.sin, d.mask, d.modality, spec, BCFG)
    valid = np.asarray(d.modality) != 0
    assert np.abs(np.asarray(got) - np.asarray(want))[valid].max() <= 1e-5 * np.abs(np.asarray(want)).max()

    rtn_weights = {g: sl.fake_quant_weights(sl.prequant_weights(r.qparams[g], r.qconsts[g], engine, Bits.of(engine)),
                                            engine) for g in r.qparams}
    for g, sols in r.solved.items():
        x = np.asarray(seen[g], np.float64)[valid]
        h = x.T @ x
        specs = sl.prequant_weights(r.qparams[g], r.qconsts[g], engine, Bits.of(engine))
        e_gptq = sum(_output_error(specs[n]["main"].w, s.weight, h) for n, s in sols.items())
        e_rtn = sum(_output_error(specs[n]["main"].w, rtn_weights[g][n]["main"], h) for n in sols)
        assert e_gptq < 0.9 * e_rtn, (g, e_gptq, e_rtn)
    assert r.final_loss <= r_rtn.final_loss
    assert r.init_loss == r_rtn.init_loss  # the transform calibration itself is unchanged


def test_on_an_identity_hessian_the_back_end_is_the_folds_rounding(data, monkeypatch):  # noqa: F811
    """With every Hessian replaced by the identity nothing moves, so the back end's checkpoint
    block is bit for bit the round-to-nearest fold: the weight it solves, its learned clipping and
    its grid are the fold's own."""
    params, d = data
    real = backend.solver

    def identity_solve(w, h, **kw):
        return real.solve(w, jnp.eye(h.shape[0], dtype=h.dtype), **{**kw, "damp": 0.0})

    monkeypatch.setattr(backend, "solver", types.SimpleNamespace(solve=identity_solve, SolverError=real.SolverError))
    for name, bits, opts in CASES.values():
        _, _, got = _calibrate(params, d, name, bits, opts, "gptq")
        _, _, want = _calibrate(params, d, name, bits, opts, "rtn")
        same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), got, want)
        assert all(jax.tree_util.tree_leaves(same)), name


def test_weight_solver_settings_are_checked():
    assert methods.get_config("splitq", "w4a4", weight_solver="gptq").engine_config().weight_solver == "gptq"
    assert methods.get_config("smoothquant", "w4a8", weight_solver="gptq").engine_config().weight_solver == "gptq"
    with pytest.raises(ConfigError, match="weight_solver: not an option of rtn"):
        methods.get_config("rtn", "w4a4", weight_solver="gptq")
    with pytest.raises(ConfigError, match="gptq rounds weights"):
        methods.get_config("flatquant", "w16a4", weight_solver="gptq")
    with pytest.raises(ConfigError, match="unknown weight_solver 'obs'"):
        methods.get_config("flatquant", "w4a4", weight_solver="obs")


@pytest.mark.slow  # the block test above checks the numerics; whole-model plain-weight runs: test_gradient_methods
def test_checkpoint_runs_in_the_runtime_and_records_the_solver(tiny, tmp_path):  # noqa: F811
    """The whole-model run of ``--method flatquant --weight-solver gptq``: it exports, its manifest
    records the solver, and the integer runtime computes the fake-quant model's logits."""
    handle, batches, stream = tiny["qwen2_5_vl"]
    cfg = methods.get_config("flatquant", "w4a8", weight_solver="gptq", epochs=0, batch_size=2)
    path, _ = qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={"source": "synthetic"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["method"] == "flatquant" and manifest["method_config"]["weight_solver"] == "gptq"
    got = assert_runtime_matches_fake_quant(load_quantized(path), batches[0])
    assert np.all(np.isfinite(got))


def test_cli_refuses_the_solver_for_a_method_without_it(tmp_path, capsys):
    rc, err = run_cli(["--method", "rtn", "--bits", "w4a4", "--weight-solver", "gptq", "--out", tmp_path / "ckpt"],
                      capsys)
    assert rc == 2 and "--weight-solver is an option of smoothquant, flatquant, splitq" in err, err
    assert list(tmp_path.iterdir()) == []
