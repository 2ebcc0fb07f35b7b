"""Qwen2.5-VL port and converter, checked against transformers' torch reference.

A tiny random HF ``Qwen2_5_VLForConditionalGeneration`` is built once per module from the
``qwen2.5-vl-tiny`` config, saved with ``save_pretrained`` and read back by our converter.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from splitq_jax.models.converters.hf import ConversionError, open_checkpoint, resolve_model_dir  # noqa: E402
from splitq_jax.models.converters.qwen2_5_vl import config_from_hf, load_qwen2_5_vl, map_key  # noqa: E402
from splitq_jax.models import layers  # noqa: E402
from splitq_jax.models.qwen2_5_vl import (PAD, TEXT, VISION, Qwen2_5_VLConfig, abstract_model,  # noqa: E402
                                          get_config, get_rope_index)

ATOL = 1e-4  # float32 agreement with the torch reference
CFG = get_config("qwen2.5-vl-tiny")


# --------------------------------------------------------------------------------------------
# Reference model and inputs
# --------------------------------------------------------------------------------------------


def hf_config(cfg: Qwen2_5_VLConfig, *, tie: bool | None = None):
    t, v = cfg.text, cfg.vision
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
            rms_norm_eps=t.rms_norm_eps, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                             "mrope_section": list(cfg.mrope_section)},
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id[0], pad_token_id=cfg.pad_token_id),
        vision_config=dict(
            depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
            patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size, window_size=v.window_size, out_hidden_size=v.out_hidden_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=v.tokens_per_second),
        image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        tie_word_embeddings=t.tie_word_embeddings if tie is None else tie)


def build_hf(cfg: Qwen2_5_VLConfig, seed: int, *, tie: bool | None = None):
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(cfg, tie=tie)).eval()
    # Fresh norms are all ones and biases all zeros; perturb them so a swapped or dropped
    # norm/bias cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
            # At the default init (std 0.02) attention is nearly uniform and positions barely
            # matter; sharper q/k make every rotary or masking mistake visible in the logits.
            if any(k in name for k in ("q_proj.weight", "k_proj.weight", "attn.qkv.weight")):
                p.mul_(6.0)
    return model


@pytest.fixture(scope="module")
def hf_model():
    return build_hf(CFG, seed=0)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen_tiny_hub")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(hf_dir):
    m, cfg = load_qwen2_5_vl(hf_dir)
    assert cfg == dataclasses.replace(CFG, hf_id=cfg.hf_id)  # config.json round trip
    return m


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def text_ids(rng, n: int) -> list[int]:
    return rng.integers(3, 100, n).tolist()  # below every special token id


def image_ids(grid) -> list[int]:
    t, h, w = grid
    n = t * h * w // CFG.vision.spatial_merge_size ** 2
    return [CFG.vision_start_token_id] + [CFG.image_token_id] * n + [CFG.vision_end_token_id]


def pixels(rng, grids) -> np.ndarray:
    n = int(sum(np.prod(g) for g in grids))
    return rng.standard_normal((n, CFG.vision.patch_dim)).astype(np.float32)


def hf_logits(hf, ids, pix=None, grids=None, mask=None, *, three_d=True) -> np.ndarray:
    kw = {"input_ids": torch.tensor(ids)}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if pix is not None:
        kw.update(pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(np.asarray(grids)))
    if three_d:  # without it HF silently uses 1-D positions
        kw["mm_token_type_ids"] = torch.tensor((np.asarray(ids) == CFG.image_token_id).astype(np.int64))
    hf.model.rope_deltas = None  # no state from an earlier generate()
    with torch.no_grad():
        return hf(**kw).logits.numpy()


def padded_batch(rows: list[list[int]], side: str) -> tuple[np.ndarray, np.ndarray]:
    n = max(map(len, rows))
    ids = np.full((len(rows), n), CFG.pad_token_id, np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


# --------------------------------------------------------------------------------------------
# Logits against the reference
# --------------------------------------------------------------------------------------------


def test_text_only_logits(model, hf_model):
    ids = np.array([text_ids(rng_for("text"), 17)])
    ref = hf_logits(hf_model, ids, three_d=False)
    ours = np.asarray(model(ids))
    assert ours.shape == ref.shape == (1, 17, CFG.text.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_one_image_logits(model, hf_model):
    rng = rng_for("one")
    grid = [1, 8, 12]  # 4x6 merged units -> six 2x2 windows
    ids = np.array([text_ids(rng, 3) + image_ids(grid) + text_ids(rng, 5)])
    pix = pixels(rng, [grid])
    ref = hf_logits(hf_model, ids, pix, [grid])
    np.testing.assert_allclose(np.asarray(model(ids, pix, np.array([grid]))), ref, atol=ATOL, rtol=0)


def test_two_images_of_different_sizes(model, hf_model):
    rng = rng_for("two")
    grids = [[1, 6, 10], [1, 4, 4]]  # 3x5 merged units: windows of unequal size at the edges
    ids = np.array([text_ids(rng, 2) + image_ids(grids[0]) + text_ids(rng, 3) + image_ids(grids[1])
                    + text_ids(rng, 4)])
    pix = pixels(rng, grids)
    ref = hf_logits(hf_model, ids, pix, grids)
    np.testing.assert_allclose(np.asarray(model(ids, pix, np.array(grids))), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_two(model, hf_model, side):
    """Rows with one image, two images and no image, padded on one side."""
    rng = rng_for("pad" + side)
    grids = [[1, 4, 8], [1, 8, 4], [1, 4, 4]]
    rows = [text_ids(rng, 2) + image_ids(grids[0]) + text_ids(rng, 2),
            text_ids(rng, 5) + image_ids(grids[1]) + text_ids(rng, 3) + image_ids(grids[2]) + text_ids(rng, 2),
            text_ids(rng, 13)]
    ids, mask = padded_batch(rows, side)
    pix = pixels(rng, grids)
    ref = hf_logits(hf_model, ids, pix, grids, mask)
    ours = np.asarray(model(ids, pix, np.array(grids), mask))
    real = mask.astype(bool)
    assert (~real).sum() >= 8  # the test really pads
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
    # the positions are HF's exactly, including at the padding
    hf_pos, hf_delta = hf_model.model.get_rope_index(
        torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == CFG.image_token_id).astype(np.int64)),
        image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    pos, delta = get_rope_index(ids, CFG, attention_mask=mask, image_grid_thw=np.array(grids))
    np.testing.assert_array_equal(pos, hf_pos.numpy())
    np.testing.assert_array_equal(delta, hf_delta.numpy()[:, 0])


def test_reference_used_3d_positions(model, hf_model):
    """The agreement above is with HF's M-RoPE path, not its silent 1-D fallback."""
    rng = rng_for("3d")
    grid = [1, 8, 8]
    ids = np.array([text_ids(rng, 4) + image_ids(grid) + text_ids(rng, 4)])
    pix = pixels(rng, [grid])
    ref_3d = hf_logits(hf_model, ids, pix, [grid], three_d=True)
    ref_1d = hf_logits(hf_model, ids, pix, [grid], three_d=False)
    ours = np.asarray(model(ids, pix, np.array([grid])))
    after = slice(4 + 1 + 16, None)  # positions from the image on see different rotations
    assert np.abs(ref_3d - ref_1d)[:, after].max() > 100 * ATOL
    np.testing.assert_allclose(ours, ref_3d, atol=ATOL, rtol=0)
    assert np.abs(ours - ref_1d)[:, after].max() > 100 * ATOL
    # and our ids are genuinely 3-D: the image tokens' height and width rows differ
    emb = model.embed(ids, pix, np.array([grid]))
    img = np.asarray(emb.modality_mask[0]) == VISION
    pos = np.asarray(emb.position_ids)[:, 0, img]
    assert len(np.unique(pos[1])) == 4 and len(np.unique(pos[2])) == 4 and len(np.unique(pos[0])) == 1


def test_generate_matches_hf_greedy(model, hf_model):
    rng = rng_for("gen")
    grids = [[1, 4, 8], [1, 8, 8]]
    rows = [text_ids(rng, 3) + image_ids(grids[0]) + text_ids(rng, 2),
            text_ids(rng, 2) + image_ids(grids[1]) + text_ids(rng, 3)]
    ids, mask = padded_batch(rows, "left")
    pix = pixels(rng, grids)
    hf_model.model.rope_deltas = None
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pix),
            image_grid_thw=torch.tensor(grids),
            mm_token_type_ids=torch.tensor((ids == CFG.image_token_id).astype(np.int64)),
            max_new_tokens=20, do_sample=False, eos_token_id=CFG.eos_token_id[0],
            pad_token_id=CFG.pad_token_id)[:, ids.shape[1]:].numpy()
    ours = model.generate(ids, pix, np.array(grids), mask, max_new_tokens=20,
                          eos_token_id=CFG.eos_token_id, pad_token_id=CFG.pad_token_id)
    assert ours.shape == (2, 20)
    # HF stops early once every row has emitted EOS; the remaining slots are padding
    ref = np.pad(ref, ((0, 0), (0, 20 - ref.shape[1])), constant_values=CFG.pad_token_id)
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ours)) >= 3  # not a degenerate constant stream


# --------------------------------------------------------------------------------------------
# Block-by-block interface
# --------------------------------------------------------------------------------------------


def test_block_by_block_equals_whole_and_reference_layer(model, hf_model):
    rng = rng_for("blocks")
    grid = [1, 4, 8]
    ids, mask = padded_batch([text_ids(rng, 2) + image_ids(grid) + text_ids(rng, 3), text_ids(rng, 6)], "left")
    pix = pixels(rng, [grid])
    emb = model.embed(ids, pix, np.array([grid]), mask)
    np.testing.assert_array_equal(np.asarray(emb.modality_mask),
                                  np.where(mask == 0, PAD, np.where(ids == CFG.image_token_id, VISION, TEXT)))
    cos, sin = model.rope(emb.position_ids)
    attn_mask = model.attention_mask(emb.modality_mask)
    b, n = ids.shape
    hd = CFG.text.resolved_head_dim
    assert cos.shape == sin.shape == (b, n, hd) and attn_mask.shape == (b, n, n) and attn_mask.dtype == bool

    # Each of our blocks against the HF decoder layer given the same rotary tables and mask.
    hf_layers = hf_model.model.language_model.layers
    additive = torch.tensor(np.where(np.asarray(attn_mask), 0.0, np.finfo(np.float32).min)[:, None])
    x = emb.hidden
    real = mask.astype(bool)
    for block, hf_layer in zip(model.blocks, hf_layers):
        with torch.no_grad():
            ref = hf_layer(torch.tensor(np.asarray(x)), attention_mask=additive,
                           position_embeddings=(torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin))))
        x = block(x, cos, sin, attn_mask)
        np.testing.assert_allclose(np.asarray(x)[real], ref.numpy()[real], atol=ATOL, rtol=0)
    whole = np.asarray(model(ids, pix, np.array([grid]), mask))
    np.testing.assert_allclose(np.asarray(model.head(x))[real], whole[real], atol=1e-5, rtol=0)

    p = model.blocks[0].block_params()
    d, i_sz = CFG.text.hidden_size, CFG.text.intermediate_size
    h, kv = CFG.text.num_heads, CFG.text.num_kv_heads
    shapes = jax.tree.map(lambda a: a.shape, p)
    assert shapes == {
        "input_layernorm": {"scale": (d,)},
        "q_proj": {"w": (h * hd, d), "b": (h * hd,)}, "k_proj": {"w": (kv * hd, d), "b": (kv * hd,)},
        "v_proj": {"w": (kv * hd, d), "b": (kv * hd,)}, "o_proj": {"w": (d, h * hd)},
        "post_attention_layernorm": {"scale": (d,)},
        "gate_proj": {"w": (i_sz, d)}, "up_proj": {"w": (i_sz, d)}, "down_proj": {"w": (d, i_sz)}}
    # HF orientation: the arrays are the torch weights themselves
    np.testing.assert_array_equal(np.asarray(p["q_proj"]["w"]), hf_layers[0].self_attn.q_proj.weight.detach().numpy())


def test_video_frames_and_positions_match_reference(model, hf_model):
    """t > 1: full attention per frame and temporal M-RoPE spacing, as HF does for videos."""
    rng = rng_for("video")
    grid = [2, 4, 8]
    pix = pixels(rng, [grid])
    with torch.no_grad():
        ref = hf_model.model.visual(torch.tensor(pix), grid_thw=torch.tensor([grid])).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(model.visual(jnp.asarray(pix), np.array([grid]))), ref, atol=ATOL, rtol=0)
    n_vid = 2 * 4 * 8 // 4
    ids = np.array([text_ids(rng, 2) + [CFG.vision_start_token_id] + [CFG.video_token_id] * n_vid
                    + [CFG.vision_end_token_id] + text_ids(rng, 2)])
    mm = np.where(ids == CFG.video_token_id, 2, 0)
    hf_pos, _ = hf_model.model.get_rope_index(torch.tensor(ids), mm_token_type_ids=torch.tensor(mm),
                                              video_grid_thw=torch.tensor([grid]),
                                              second_per_grid_ts=torch.tensor([1.5]))
    pos, _ = get_rope_index(ids, CFG, video_grid_thw=np.array([grid]), second_per_grid_ts=[1.5])
    np.testing.assert_array_equal(pos, hf_pos.numpy())


def test_bfloat16_close_to_float32(hf_dir, model):
    rng = rng_for("bf16")
    grid = [1, 4, 8]
    ids = np.array([text_ids(rng, 3) + image_ids(grid) + text_ids(rng, 3)])
    pix = pixels(rng, [grid])
    m16, _ = load_qwen2_5_vl(hf_dir, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx_params(m16)))
    lo = np.asarray(m16(ids, pix, np.array([grid])).astype(jnp.float32))
    hi = np.asarray(model(ids, pix, np.array([grid])))
    err = np.abs(lo - hi).max() / np.abs(hi).max()
    assert 0 < err < 0.05, err  # bf16 has ~3 significant digits; 2 decoder + 2 vision layers


def nnx_params(m):
    from flax import nnx
    return nnx.state(m, nnx.Param)


# --------------------------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------------------------


def _params_equal(a, b):
    la, lb = jax.tree.leaves(nnx_params(a)), jax.tree.leaves(nnx_params(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_key_mapping_covers_both_spellings():
    assert map_key("model.layers.3.self_attn.q_proj.bias") == (
        ("language_model", "layers", 3, "self_attn", "q_proj", "b"), None)
    assert map_key("model.language_model.layers.3.self_attn.q_proj.bias") == map_key(
        "model.layers.3.self_attn.q_proj.bias")
    assert map_key("visual.merger.mlp.2.weight") == map_key("model.visual.merger.mlp.2.weight") == (
        ("visual", "merger", "fc2", "w"), None)
    assert map_key("visual.patch_embed.proj.weight")[1] == "flatten_patch"
    assert map_key("lm_head.weight")[0] == ("language_model", "lm_head", "w")
    assert map_key("model.norm.weight")[0] == ("language_model", "norm", "scale")
    assert map_key("something.else") is None


def test_transformers5_spelling_and_sharded_checkpoint(model, hf_model, hf_dir, tmp_path):
    from safetensors.torch import save_file

    # transformers-5 in-memory spelling, written out as is
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in sd)
    t5 = tmp_path / "t5"
    t5.mkdir()
    shutil.copy(hf_dir / "config.json", t5 / "config.json")
    save_file(sd, str(t5 / "model.safetensors"))
    m_t5, _ = load_qwen2_5_vl(t5)
    _params_equal(m_t5, model)

    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    m_sh, _ = load_qwen2_5_vl(sharded)
    _params_equal(m_sh, model)
    assert len(open_checkpoint(sharded)) == len(open_checkpoint(hf_dir))


def test_tied_embeddings(tmp_path):
    hf = build_hf(CFG, seed=1, tie=True)
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in open_checkpoint(tmp_path).keys()
    m, cfg = load_qwen2_5_vl(tmp_path)
    assert cfg.text.tie_word_embeddings and m.language_model.lm_head is None
    ids = np.array([text_ids(rng_for("tied"), 11)])
    np.testing.assert_allclose(np.asarray(m(ids)), hf_logits(hf, ids, three_d=False), atol=ATOL, rtol=0)


def test_bfloat16_checkpoint(model, hf_model, hf_dir, tmp_path):
    """bf16 files are read without torch (ml_dtypes) and widen exactly to float32."""
    from safetensors.torch import save_file

    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in hf_model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    m, _ = load_qwen2_5_vl(tmp_path, dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(nnx_params(m)), jax.tree.leaves(nnx_params(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16).astype(np.float32))


def test_error_foreign_tensor_and_wrong_shape(hf_model, hf_dir, tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    save_file({**sd, "multi_modal_projector.linear_1.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="not Qwen2.5-VL weights.*multi_modal_projector"):
        load_qwen2_5_vl(tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="mlp.*has shape.*expects.*config.json"):
        load_qwen2_5_vl(tmp_path)


@pytest.fixture()
def sharded_copy(hf_model, tmp_path):
    path = tmp_path / "ckpt"
    hf_model.save_pretrained(path, max_shard_size="100KB")
    return path


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_error_missing_directory(tmp_path):
    with pytest.raises(ConversionError, match="does not exist.*pass an existing directory"):
        load_qwen2_5_vl(tmp_path / "nowhere")


def test_error_missing_shard(sharded_copy):
    victim = _shards(sharded_copy)[1]
    victim.unlink()
    with pytest.raises(ConversionError, match=f"{victim.name}.*missing.*re-download"):
        load_qwen2_5_vl(sharded_copy)


def test_error_truncated_shard(sharded_copy):
    victim = _shards(sharded_copy)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=f"{victim.name}.*corrupted or truncated.*re-download"):
        load_qwen2_5_vl(sharded_copy)


def test_error_pickle_only(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    with pytest.raises(ConversionError, match=r"only pickle.*pytorch_model\.bin.*safetensors"):
        load_qwen2_5_vl(tmp_path)


def test_error_unsupported_architecture(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match="unsupported architecture.*LlamaForCausalLM.*Qwen2_5_VL"):
        load_qwen2_5_vl(tmp_path)


def test_error_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match="HF_HUB_OFFLINE=1.*pass that directory"):
        resolve_model_dir("splitq-test/no-such-model")


# --------------------------------------------------------------------------------------------
# Real sizes (shapes only)
# --------------------------------------------------------------------------------------------


def _hub_config(hidden, inter, layers_, heads, kv, vocab, tie):
    """The layout of the published config.json files (text keys flat, ``rope_scaling``, ``in_chans``)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": inter,
        "max_position_embeddings": 128000, "num_attention_heads": heads, "num_hidden_layers": layers_,
        "num_key_value_heads": kv, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": tie, "use_sliding_window": False, "vocab_size": vocab,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": hidden, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    }


@pytest.mark.parametrize("name, hub", [
    ("qwen2.5-vl-3b", _hub_config(2048, 11008, 36, 16, 2, 151936, True)),
    ("qwen2.5-vl-7b", _hub_config(3584, 18944, 28, 28, 4, 152064, False)),
])
def test_named_configs_match_published_config_json(name, hub):
    assert config_from_hf(hub) == dataclasses.replace(get_config(name), hf_id=None)


@pytest.mark.parametrize("name, expected", [("qwen2.5-vl-3b", 3.75e9),
                                            pytest.param("qwen2.5-vl-7b", 8.29e9, marks=pytest.mark.slow)])
def test_real_config_parameter_counts(name, expected):
    m = abstract_model(get_config(name))
    total = layers.count_params(m)
    print(f"{name}: {total:,} parameters (vision {layers.count_params(m.visual):,}, "
          f"language {layers.count_params(m.language_model):,})")
    assert abs(total - expected) / expected < 0.005


def test_gradient_pass_matches_torch_autograd(model, hf_model):
    """dL/dy of the answer loss at v_proj, o_proj and down_proj of every layer equals torch
    autograd of the HF model on the same weights and inputs (an image, a question, an answer)."""
    from gradient_reference import assert_gradients_match

    rng = rng_for("gradients")
    grid = (1, 4, 4)
    ids = np.array([text_ids(rng, 3) + image_ids(grid) + text_ids(rng, 4) + text_ids(rng, 5)])
    modality = np.where(ids == CFG.image_token_id, 2, 1)
    modality[:, -5:] = 3
    pix = pixels(rng, [grid])
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pix,
             "image_grid_thw": np.array([grid]), "modality": modality}
    hf_model.model.rope_deltas = None
    kw = {"input_ids": torch.tensor(ids), "pixel_values": torch.tensor(pix), "image_grid_thw": torch.tensor([grid]),
          "mm_token_type_ids": torch.tensor((ids == CFG.image_token_id).astype(np.int64))}
    assert_gradients_match(model, "qwen2_5_vl", batch, hf_model, hf_model.model.language_model.layers, kw)
