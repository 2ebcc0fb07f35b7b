"""Vision-tower quantization (paper A.4): functional vision blocks, their calibration and folding."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from splitq_jax.methods import transform
from splitq_jax import calibrate as cal
from splitq_jax import pipeline
from splitq_jax.quantized import fold
from splitq_jax import vision_block as vb
from splitq_jax.calib import vision as cv
from splitq_jax.block import fp_block
from splitq_jax.config import method_config
from splitq_jax.models import llava
from splitq_jax.models.qwen2_5_vl import Qwen2_5_VL, get_config, segment_mask
from tests.test_pipeline import tiny_batches


@pytest.fixture(scope="module")
def qwen():
    cfg = get_config("qwen2.5-vl-tiny")
    model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
    batches = tiny_batches(cfg, n_batches=2, batch=2)
    # one larger image so that images differ in length (padding) and windows matter
    rng = np.random.default_rng(3)
    b = dict(batches[1])
    b["pixel_values"] = np.concatenate([b["pixel_values"][:16], rng.normal(size=(64, 96)).astype(np.float32)])
    b["image_grid_thw"] = np.array([[1, 4, 4], [1, 8, 8]])
    batches[1] = b
    return model, batches


@pytest.fixture(scope="module")
def clip():
    cfg = llava.get_config("llava-1.5-tiny")
    model = llava.Llava(cfg, rngs=nnx.Rngs(0))
    s = cfg.vision.image_size
    pix = np.random.default_rng(0).normal(size=(6, 3, s, s)).astype(np.float32)
    return model, [{"pixel_values": pix[:3]}, {"pixel_values": pix[3:]}]


def test_qwen_functional_block_equals_module(qwen):
    model, batches = qwen
    tower = model.visual
    pix = jnp.asarray(batches[1]["pixel_values"][16:])
    inp = tower.block_inputs(pix, ((1, 8, 8),))
    bcfg = vb.block_config(model, "qwen2_5_vl")
    assert (bcfg.hidden, bcfg.num_heads) == (tower.config.hidden_size, tower.config.num_heads)
    for i, block in enumerate(tower.blocks):
        mask = segment_mask(inp.full_segments if tower.block_mask_kinds()[i] == "full" else inp.window_segments)
        want = block(inp.x, inp.cos, inp.sin, mask)
        got = fp_block(vb.block_params(block, "qwen2_5_vl"), inp.x[None], inp.cos[None], inp.sin[None], mask[None], bcfg)
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert set(tower.block_mask_kinds()) == {"full", "window"}  # the tiny tower has both kinds


def test_clip_functional_block_equals_module(clip):
    model, batches = clip
    x = model.vision_tower.embed(jnp.asarray(batches[0]["pixel_values"]))
    bcfg = vb.block_config(model, "llava")
    for layer in model.vision_tower.layers:
        want = layer(x)
        got = fp_block(vb.block_params(layer, "llava"), x, None, None, None, bcfg)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
        x = want


def test_qwen_vision_stream_reproduces_tower(qwen):
    """Running the stream through the FP blocks (with the per-block masks) gives the tower's
    output for every image: padding and window masks are right."""
    model, batches = qwen
    stream = cv.vision_stream(model, "qwen2_5_vl", batches)
    images = cv.qwen_images(batches)
    assert stream.x.shape[0] == len(images) == 4
    bcfg = vb.block_config(model, "qwen2_5_vl")
    x = stream.x
    for i, block in enumerate(vb.quantized_blocks(model, "qwen2_5_vl")):
        x = fp_block(vb.block_params(block, "qwen2_5_vl"), x, stream.cos, stream.sin, stream.mask_for(i), bcfg)
    for s, (pix, grid) in enumerate(images):
        n = pix.shape[0]
        assert int(jnp.sum(stream.modality[s] == cal.VISION)) == n
        inp = model.visual.block_inputs(jnp.asarray(pix), (grid,))
        want = model.visual.forward(jnp.asarray(pix), (grid,))
        got = model.visual.merge(x[s, :n], inp.window_index)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_vision_method_config():
    cfg = method_config("splitq", "w3a3")
    v = cv.vision_method_config(cfg, "w4a4")
    assert (v.w_bits, v.a_bits, v.text_ratio, v.mac, v.cws) == (4, 4, 0.0, False, True)
    assert v.vision_ratio == cfg.vision_ratio and v.selector == "mocd"
    assert cv.vision_method_config(cfg).bits == "w3a3"


def _vision_block_data(family, qwen, clip):
    """The first vision block's (params with non-trivial norms, BlockData, block config, cfg)."""
    model, batches = qwen if family == "qwen2_5_vl" else clip
    stream = cv.vision_stream(model, family, batches)
    bcfg = vb.block_config(model, family)
    blocks = vb.quantized_blocks(model, family)
    params = vb.block_params(blocks[0], family)
    rng = np.random.default_rng(1)  # non-trivial norms (the random modules start at scale 1, bias 0)
    params = {k: ({n: jnp.asarray(v + 0.2 * rng.normal(size=v.shape), jnp.float32) for n, v in p.items()}
                  if k in bcfg.norm_keys else p) for k, p in params.items()}
    cfg = cv.vision_method_config(method_config("splitq", "w4a4", epochs=6, batch_size=2, vision_ratio=0.1))
    data = cal.make_block_data(params, stream.x, stream.cos, stream.sin, stream.mask_for(0), stream.modality, bcfg)
    return params, data, bcfg, cfg, np.asarray(stream.modality != cal.PAD)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_vision_blocks_identity_with_quantizers_off(family, qwen, clip):
    """Exact identity (every quantizer off) through calibration and folding -- incl. the diagonal
    folded into LayerNorm scale *and* bias for CLIP."""
    params, data, bcfg, cfg, valid = _vision_block_data(family, qwen, clip)
    scale = float(jnp.max(jnp.abs(data.y)))
    off = cfg.replace(w_bits=None, a_bits=None)
    res = cal.fit_block(params, data, off.replace(epochs=1), bcfg)
    assert all(len(s.vision_idx) > 0 and len(s.text_idx) == 0 for g, s in res.stats.items() if g != "attn_out")
    y = cal.qblock_forward(res.qparams, res.qconsts, data.x, data.cos, data.sin, data.mask, data.modality, off, bcfg)
    folded = transform.fold_block(res.qparams, res.qconsts, off, bcfg=bcfg)
    y_fold = fold.folded_block_forward(folded, data.x, data.cos, data.sin, data.mask, data.modality, off, bcfg)
    for out in (y, y_fold):
        assert float(np.max(np.abs(np.asarray(out) - np.asarray(data.y))[valid])) < 1e-5 * scale
    # the diagonal really was folded into the norms (incl. LayerNorm bias)
    norm = bcfg.group_norm["attn_in"]
    assert not np.allclose(np.asarray(folded["norms"][norm]["scale"]), np.asarray(params[norm]["scale"]))
    if family == "llava":
        assert not np.allclose(np.asarray(folded["norms"][norm]["bias"]), np.asarray(params[norm]["bias"]))


# The vision blocks' training step (test_cli and test_small_vlm only initialise them). CLIP's is
# slow: a step compiled for it alone, its LayerNorm fold is checked exactly above.
@pytest.mark.parametrize("family", ["qwen2_5_vl", pytest.param("llava", marks=pytest.mark.slow)])
def test_vision_block_w4a4_calibration_lowers_the_loss(family, qwen, clip):
    params, data, bcfg, cfg, _ = _vision_block_data(family, qwen, clip)
    res4 = cal.fit_block(params, data, cfg, bcfg)
    assert np.isfinite(res4.final_loss) and res4.final_loss < res4.init_loss


def test_calibrate_blocks_vision_part(qwen, tmp_path):
    model, batches = qwen
    stream = cv.vision_stream(model, "qwen2_5_vl", batches)
    bcfg = vb.block_config(model, "qwen2_5_vl")
    cfg = cv.vision_method_config(method_config("rtn", "w4a4"))
    blocks = vb.quantized_blocks(model, "qwen2_5_vl")
    res = pipeline.quantize_blocks([lambda b=b: vb.block_params(b, "qwen2_5_vl") for b in blocks], bcfg, stream,
                                    cfg, part="vision")
    assert [r.part for r in res.reports] == ["vision"] * len(blocks)
    assert all(np.isfinite(r.final_loss) for r in res.reports)


def test_no_vision_tower_errors():
    with pytest.raises(ValueError, match="no vision tower"):
        vb.block_config(object(), "gguf")
