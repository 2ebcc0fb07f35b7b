"""Per-block calibration, methods as configs, and folding, on one tiny Qwen2-style block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax.methods import transform
from splitq_jax import calibrate as cal
from splitq_jax.methods.splitq import mocd
from splitq_jax.quantized import fold, group
from splitq_jax.block import BlockConfig, causal_mask, fp_block, init_block_params, rope_1d
from splitq_jax.config import ConfigError, method_config, parse_bits
from splitq_jax.quant import QuantError

BCFG = BlockConfig(hidden=48, intermediate=96, num_heads=4, num_kv_heads=2)
S, N, N_VIS = 8, 24, 10
TEXT_OUT, VIS_OUT = (5, 30), (12, 41)


@pytest.fixture(scope="module")
def data():
    params = init_block_params(jax.random.PRNGKey(0), BCFG, scale=0.15)
    x = jax.random.normal(jax.random.PRNGKey(1), (S, N, BCFG.hidden))
    # vision tokens first; each modality has its own outlier channels (the paper's observation)
    is_vis = jnp.arange(N) < N_VIS
    gain = jnp.ones((N, BCFG.hidden))
    gain = gain.at[:, VIS_OUT[0]].set(jnp.where(is_vis, 25.0, 1.0)).at[:, VIS_OUT[1]].set(jnp.where(is_vis, 18.0, 1.0))
    gain = gain.at[:, TEXT_OUT[0]].set(jnp.where(is_vis, 1.0, 15.0)).at[:, TEXT_OUT[1]].set(jnp.where(is_vis, 1.0, 12.0))
    x = x * gain
    modality = jnp.where(is_vis, 2, 1)[None].repeat(S, 0)
    valid = jnp.ones((S, N), bool).at[-1, -3:].set(False)  # one padded sample
    modality = jnp.where(valid, modality, 0)
    cos, sin = rope_1d(jnp.cumsum(valid, axis=1) - 1, BCFG.head_dim)
    d = cal.make_block_data(params, x, cos, sin, causal_mask(valid), modality, BCFG)
    return params, d


@pytest.fixture(scope="module")
def splitq_run(data):
    params, d = data
    cfg = method_config("splitq", "w4a4", epochs=4, batch_size=4, mac_gate_init=0.0)
    return cfg, cal.fit_block(params, d, cfg, BCFG)


def _fwd(qp, qc, d, cfg, **kw):
    return cal.qblock_forward(qp, qc, d.x, d.cos, d.sin, d.mask, d.modality, cfg, BCFG, **kw)


def _valid_max_err(a, b, d):
    valid = np.asarray(d.modality != 0)
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))[valid]))


def test_block_identity_at_init_before_and_after_folding(data):
    params, d = data
    for main_path in ("masked", "gathered"):
        cfg = method_config("splitq", "w4a4", main_path=main_path)
        stats = cal.collect_stats(params, d, cfg, BCFG)
        for g, width in (("attn_in", 48), ("mlp_in", 48), ("mlp_out", 96)):
            k_t, k_v = mocd.channel_counts(width, cfg.text_ratio, cfg.vision_ratio)
            assert (len(stats[g].text_idx), len(stats[g].vision_idx)) == (k_t, k_v) == (-(-width // 50),) * 2
        assert len(stats["attn_out"].text_idx) == 0  # MOCD on o_proj is off by default
        qp, qc = cal.init_qblock(jax.random.PRNGKey(0), params, stats, cfg, BCFG)
        y_off = _fwd(qp, qc, d, cfg, quantize=False)
        off = cfg.replace(w_bits=None, a_bits=None)
        y_fold = fold.folded_block_forward(transform.fold_block(qp, qc, off), d.x, d.cos, d.sin, d.mask, d.modality, off, BCFG)
        scale = float(jnp.max(jnp.abs(d.y)))
        assert _valid_max_err(y_off, d.y, d) < 1e-5 * scale
        assert _valid_max_err(y_fold, d.y, d) < 1e-5 * scale


def test_calibration_lowers_loss_and_identity_survives_training(data, splitq_run):
    params, d = data
    cfg, r = splitq_run
    assert r.final_loss < 0.9 * r.init_loss
    assert len(r.epoch_losses) == 4 and r.epoch_losses[-1] < r.epoch_losses[0]
    # after training, gates and transforms moved, yet quantizers-off is still the FP block
    scale = float(jnp.max(jnp.abs(d.y)))
    assert _valid_max_err(_fwd(r.qparams, r.qconsts, d, cfg, quantize=False), d.y, d) < 1e-5 * scale
    off = cfg.replace(w_bits=None, a_bits=None)
    f0 = transform.fold_block(r.qparams, r.qconsts, off)
    y0 = fold.folded_block_forward(f0, d.x, d.cos, d.sin, d.mask, d.modality, off, BCFG)
    assert _valid_max_err(y0, d.y, d) < 1e-5 * scale


def test_folded_block_reproduces_calibrated_block(data, splitq_run):
    _, d = data
    cfg, r = splitq_run
    y_cal = _fwd(r.qparams, r.qconsts, d, cfg)
    folded = transform.fold_block(r.qparams, r.qconsts, cfg)
    # c went into the norms: the online main transforms of attn_in / mlp_in carry no diagonal
    assert "c" not in folded["groups"]["attn_in"]["acts"]["transform"]
    assert "c" in folded["groups"]["mlp_out"]["acts"]["transform"]
    y_fold = fold.folded_block_forward(folded, d.x, d.cos, d.sin, d.mask, d.modality, cfg, BCFG)
    scale = float(jnp.max(jnp.abs(y_cal)))
    assert _valid_max_err(y_fold, y_cal, d) < 1e-4 * scale
    # and the packed weights are really low-bit words
    q = folded["groups"]["attn_in"]["weights"]["q_proj"]
    assert q["main"].qvalue.dtype == jnp.uint8 and q["main"].bits == 4
    assert q["cws"]["l_in"].bits == 4 and q["text"].bits == 4


def test_gradients_reach_every_learned_part(data, splitq_run):
    params, d = data
    cfg, r = splitq_run
    # gradient of the raw block MSE at the calibrated point (MAC's gate gets one even at 0)
    grads = jax.jit(jax.grad(cal.loss_fn), static_argnums=(3, 4))(r.qparams, r.qconsts, d.batch(0, 4), cfg, BCFG)
    g = grads["attn_in"]
    leaves = {
        "p1": g["transform"]["p1"], "p2": g["transform"]["p2"], "c": g["transform"]["c"],
        "act_clip": g["act_clip"]["max"], "w_clip": g["weights"]["q_proj"]["clip"]["max"],
        "cws_gate": g["weights"]["q_proj"]["cws_gate"], "mac_gate": g["weights"]["q_proj"]["mac_gate"],
        "text_w_clip": g["weights"]["k_proj"]["text_clip"]["min"],
        # mlp_out's outlier groups have two channels each, so their 2 x 2 transforms matter
        "text_transform": grads["mlp_out"]["text"]["transform"]["p"],
        "vision_transform": grads["mlp_out"]["vision"]["transform"]["p"],
    }
    # attn_in's outlier groups have one channel (48 channels x 2%): a 1 x 1 transform could not
    # change a quantized result (one value per token and per weight row is exact), so none is kept
    assert r.qparams["attn_in"]["text"]["transform"] is None and r.qparams["attn_in"]["vision"]["transform"] is None
    assert r.qparams["mlp_out"]["text"]["transform"]["p"].shape == (2, 2)
    for name, leaf in leaves.items():
        leaf = np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), name
        assert np.max(np.abs(leaf)) > 0, name


def test_methods_are_configs_of_one_engine(data):
    params, d = data
    losses = {}
    for method in ("rtn", "smoothquant", "flatquant"):
        cfg = method_config(method, "w4a4", epochs=3)
        r = cal.fit_block(params, d, cfg, BCFG)
        losses[method] = r.final_loss
        assert all(len(s.text_idx) == 0 and len(s.vision_idx) == 0 for s in r.stats.values())
        assert "cws_gate" not in r.qparams["attn_in"]["weights"]["q_proj"]
        if method != "flatquant":
            assert r.epoch_losses == [] and r.final_loss == r.init_loss
    assert losses["rtn"] > losses["smoothquant"] > losses["flatquant"]
    assert not method_config("rtn", "w4a4").trains and method_config("flatquant", "w4a4").trains


def test_frozen_parts_get_no_update(splitq_run):
    """Ablation switches freeze exactly their leaves (e.g. the paper's frozen-SVD-branch ablation)."""
    cfg, r = splitq_run
    frozen_cfg = cfg.replace(learn_gates=False, learn_diag=False)
    labels = cal.param_labels(r.qparams, frozen_cfg)
    assert labels["attn_in"]["weights"]["q_proj"]["cws_gate"] == "frozen"
    assert labels["attn_in"]["transform"]["c"] == "frozen"
    assert labels["attn_in"]["transform"]["p1"] == "main"
    assert labels["attn_in"]["act_clip"]["max"] == "clip"
    opt = cal.make_optimizer(frozen_cfg, 10)
    ones = jax.tree_util.tree_map(jnp.ones_like, r.qparams)
    upd, _ = opt.update(ones, opt.init(r.qparams), r.qparams)
    g = upd["mlp_in"]
    assert float(jnp.max(jnp.abs(g["weights"]["up_proj"]["cws_gate"]))) == 0.0
    assert float(jnp.max(jnp.abs(g["transform"]["c"]))) == 0.0
    assert float(jnp.max(jnp.abs(g["transform"]["p1"]))) > 0.0
    # clipping logits move at 10x the transform learning rate (AdamW's first step is ~lr * sign)
    ratio = float(jnp.abs(g["act_clip"]["max"]) / jnp.max(jnp.abs(g["transform"]["p1"])))
    assert ratio == pytest.approx(cfg.clip_lr / cfg.lr, rel=0.05)


def test_token_weights_change_the_loss(data):
    _, d = data
    out = d.y + jnp.where((d.modality == 2)[..., None], 1.0, 0.1)
    base = cal.block_mse(out, d.y, d.modality, method_config("splitq", "w4a4"))
    vis_heavy = cal.block_mse(out, d.y, d.modality, method_config("splitq", "w4a4", loss_vision_weight=4.0))
    assert vis_heavy > base
    # pads never count
    out_pad = out + jnp.where((d.modality == 0)[..., None], 1e6, 0.0)
    assert float(cal.block_mse(out_pad, d.y, d.modality, method_config("splitq", "w4a4"))) == pytest.approx(float(base))


def test_quantized_block_inputs_are_accepted(data):
    params, d = data
    x_q = d.x + 0.01
    d2 = cal.make_block_data(params, d.x, d.cos, d.sin, d.mask, d.modality, BCFG, x_quant=x_q)
    np.testing.assert_array_equal(np.asarray(d2.x), np.asarray(x_q))
    np.testing.assert_array_equal(np.asarray(d2.y), np.asarray(d.y))  # target: FP block on FP input


def test_bad_input_errors(data):
    params, d = data
    with pytest.raises(ValueError, match="NaN or inf"):
        cal.make_block_data(params, d.x.at[0, 0, 0].set(jnp.nan), d.cos, d.sin, d.mask, d.modality, BCFG)
    with pytest.raises(ValueError, match="expected"):
        cal.make_block_data(params, d.x[..., :10], d.cos, d.sin, d.mask, d.modality, BCFG)
    with pytest.raises(QuantError, match="unsupported bit width"):
        method_config("splitq", "w9a4")
    with pytest.raises(ConfigError, match="wXaY"):
        parse_bits("int4")
    with pytest.raises(ConfigError, match="no main"):
        method_config("splitq", "w4a4", text_ratio=0.6, vision_ratio=0.5)
    with pytest.raises(ConfigError, match="selector"):
        method_config("splitq", "w4a4", selector="biggest")
    with pytest.raises(ConfigError, match="method"):
        method_config("gptq", "w4a4")
    assert parse_bits("W4A8") == (4, 8) and parse_bits("w16a16") == (None, None)


def test_fp_block_matches_model_decoder_layer():
    """The functional block equals the Flax decoder layer (itself verified against transformers)."""
    from flax import nnx

    from splitq_jax.models.layers import DecoderConfig, DecoderLayer

    dc = DecoderConfig(vocab_size=32, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=4,
                       num_kv_heads=2, qkv_bias=True, rope_theta=1e6)
    layer = DecoderLayer(dc, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 9, 48))
    valid = jnp.ones((2, 9), bool).at[1, :2].set(False)
    mask = causal_mask(valid)
    cos, sin = rope_1d(jnp.maximum(jnp.cumsum(valid, 1) - 1, 0), 12)
    want = layer(x, cos, sin, mask)
    got = fp_block(layer.block_params(), x, cos, sin, mask, BCFG)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_smoothquant_folds_to_no_transform(data):
    """SmoothQuant smooths the inputs a norm feeds (q/k/v, gate/up) and its scales fold into
    those norms: the folded block holds no transform at all, scales the norms by exactly the
    calibrated ``c`` and computes the calibrated block."""
    params, d = data
    cfg = method_config("smoothquant", "w4a4")
    r = cal.fit_block(params, d, cfg, BCFG)
    assert r.qparams["attn_out"]["transform"] is None and r.qparams["mlp_out"]["transform"] is None
    folded = transform.fold_block(r.qparams, r.qconsts, cfg)
    assert all(f["acts"]["transform"] is None for f in folded["groups"].values())
    for g, norm in BCFG.group_norm.items():
        c = r.qparams[g]["transform"]["c"]
        np.testing.assert_array_equal(folded["norms"][norm]["scale"], params[norm]["scale"] * c)
    y_cal = _fwd(r.qparams, r.qconsts, d, cfg)
    y_fold = fold.folded_block_forward(folded, d.x, d.cos, d.sin, d.mask, d.modality, cfg, BCFG)
    assert _valid_max_err(y_fold, y_cal, d) < 1e-4 * float(jnp.max(jnp.abs(y_cal)))


def test_full_main_masks_are_dropped_only_when_exact():
    """The canonical fold drops a main part's mask and index only when it is every channel in
    order with no outlier channel; the runtime's main input is then ``x`` itself, equal to the
    masked and the gathered forms of the same split."""
    d, none = 6, jnp.zeros((0,), jnp.int32)
    full = {"main_mask": jnp.ones(d, bool), "main_idx": jnp.arange(d), "text_idx": none, "vision_idx": none}
    assert fold.is_full_main(full)
    assert not fold.is_full_main({**full, "main_mask": jnp.ones(d, bool).at[2].set(False)})
    assert not fold.is_full_main({**full, "main_idx": jnp.arange(d)[::-1]})
    assert not fold.is_full_main({**full, "text_idx": jnp.asarray([1])})
    assert not jax.jit(fold.is_full_main)(full)  # traced: unknown, kept
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, d)), jnp.float32)
    canonical = {**full, "main_mask": None, "main_idx": None}
    for path in ("masked", "gathered"):
        np.testing.assert_array_equal(group.main_input(x, canonical, path), group.main_input(x, full, path))


def test_identity_transforms_are_dropped_only_when_exact():
    eye, rot = jnp.eye(4), jnp.asarray(np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0], jnp.float32)
    assert fold.drop_identity({"p1": eye, "p2": eye}) is None
    assert fold.drop_identity({"p1": eye, "p2": rot}) is not None
    assert fold.drop_identity({"p1": eye, "p2": eye, "c": jnp.ones(16)}) is not None  # a diagonal stays online
    assert fold.drop_identity({"p1": eye.at[0, 1].set(1e-30), "p2": eye}) is not None
    assert jax.jit(fold.drop_identity)({"p1": eye, "p2": eye}) is not None  # traced: unknown, kept
