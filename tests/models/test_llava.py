"""LLaVA-1.5 port and converter, checked against transformers' torch reference.

A tiny random HF ``LlavaForConditionalGeneration`` is built once per module from the
``llava-1.5-tiny`` config, saved with ``save_pretrained`` and read back by our converter.
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

from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from splitq_jax.models.converters.hf import ConversionError  # noqa: E402
from splitq_jax.models.converters.llava import load_llava, map_key  # noqa: E402
from splitq_jax.models.layers import count_params  # noqa: E402
from splitq_jax.models.llava import PAD, TEXT, VISION, LlavaConfig, abstract_model, get_config  # noqa: E402

ATOL = 1e-4  # float32 agreement with the torch reference
CFG = get_config("llava-1.5-tiny")
N_IMG = CFG.num_image_tokens


# --------------------------------------------------------------------------------------------
# Reference model and inputs
# --------------------------------------------------------------------------------------------


def hf_config(cfg: LlavaConfig):
    t, v = cfg.text, cfg.vision
    return transformers.LlavaConfig(
        text_config=dict(
            model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id[0], pad_token_id=cfg.pad_token_id),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
            patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, projection_dim=16),
        image_token_index=cfg.image_token_id, image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, pad_token_id=cfg.pad_token_id)


def build_hf(cfg: LlavaConfig, seed: int):
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(hf_config(cfg)).eval()
    # Fresh norms are all ones and biases all zeros, and the default init is so small that the
    # decoder barely depends on its input; widen everything so that a swapped or dropped weight
    # cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1 if p.ndim > 1 else 0.05)
    return model


@pytest.fixture(scope="module")
def hf_model():
    return build_hf(CFG, seed=0)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_tiny_hub")
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(hf_dir):
    m, cfg = load_llava(hf_dir)
    assert cfg == dataclasses.replace(CFG, hf_id=cfg.hf_id)  # config.json round trip
    return m


def rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def text_ids(rng, n: int) -> list[int]:
    return rng.integers(3, 100, n).tolist()  # below the image token id


def pixels(rng, n: int) -> np.ndarray:
    v = CFG.vision
    return rng.standard_normal((n, 3, v.image_size, v.image_size)).astype(np.float32)


def padded_batch(rows: list[list[int]], side: str) -> tuple[np.ndarray, np.ndarray]:
    n = max(map(len, rows))
    ids = np.full((len(rows), n), CFG.pad_token_id, np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def hf_logits(hf, ids, pix=None, mask=None) -> np.ndarray:
    kw = {"input_ids": torch.tensor(ids)}
    if pix is not None:
        kw["pixel_values"] = torch.tensor(pix)
    if mask is not None:
        # A plain forward numbers positions 0..N-1 even across padding; generate() counts real
        # tokens only. Pass the latter explicitly: it is what our model does in both cases.
        kw["attention_mask"] = torch.tensor(mask)
        kw["position_ids"] = torch.tensor(np.where(mask == 1, np.cumsum(mask, 1) - 1, 1))
    with torch.no_grad():
        return hf(**kw).logits.numpy()


# --------------------------------------------------------------------------------------------
# Whole-model agreement
# --------------------------------------------------------------------------------------------


def test_text_only_logits_match_hf(model, hf_model):
    ids = np.array([text_ids(rng_for("text"), 16)])
    ref = hf_logits(hf_model, ids)
    ours = np.asarray(model(ids))
    assert ours.shape == ref.shape == (1, 16, CFG.text.vocab_size)
    assert np.abs(ours - ref).max() < ATOL
    assert np.abs(ref).max() > 0.5  # the comparison is not between two near-zero tensors


def test_one_image_logits_match_hf(model, hf_model):
    rng = rng_for("one")
    ids = np.array([text_ids(rng, 3) + [CFG.image_token_id] * N_IMG + text_ids(rng, 9)])
    pix = pixels(rng, 1)
    ref = hf_logits(hf_model, ids, pix)
    ours = np.asarray(model(ids, pix))
    assert np.abs(ours - ref).max() < ATOL
    # the image matters: other pixels change the logits after the image
    other = np.asarray(model(ids, pixels(rng, 1)))
    assert np.abs(other - ours)[0, 3 + N_IMG:].max() > 1e-2


def test_image_features_match_hf(model, hf_model):
    pix = pixels(rng_for("features"), 2)
    with torch.no_grad():
        ref = hf_model.model.get_image_features(pixel_values=torch.tensor(pix)).pooler_output
    ref = torch.stack(list(ref)).numpy()
    ours = np.asarray(model.image_features(pix))
    assert ours.shape == ref.shape == (2, N_IMG, CFG.text.hidden_size)
    assert np.abs(ours - ref).max() < ATOL


def test_two_images_logits_match_hf(model, hf_model):
    rng = rng_for("two")
    img = [CFG.image_token_id] * N_IMG
    ids = np.array([text_ids(rng, 2) + img + text_ids(rng, 3) + img + text_ids(rng, 3)])
    assert ids.shape == (1, 16)  # one length for the single-row tests: one compile
    pix = pixels(rng, 2)
    assert np.abs(np.asarray(model(ids, pix)) - hf_logits(hf_model, ids, pix)).max() < ATOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_match_hf_and_unpadded(model, hf_model, side):
    rng = rng_for("batch")
    img = [CFG.image_token_id] * N_IMG
    rows = [text_ids(rng, 2) + img + text_ids(rng, 3) + img + text_ids(rng, 2), text_ids(rng, 3) + img + text_ids(rng, 1)]
    ids, mask = padded_batch(rows, side)
    pix = pixels(rng, 3)
    ours = np.asarray(model(ids, pix, mask))
    ref = hf_logits(hf_model, ids, pix, mask)
    real = mask == 1
    assert np.abs(ours - ref)[real].max() < ATOL
    # each row equals the same prompt run alone
    alone = np.asarray(model(np.array([rows[1]]), pix[2:]))[0]
    assert np.abs(ours[1][real[1]] - alone).max() < 1e-5


def test_generate_matches_hf_greedy(model, hf_model):
    rng = rng_for("gen")
    img = [CFG.image_token_id] * N_IMG
    rows = [text_ids(rng, 3) + img + text_ids(rng, 2), text_ids(rng, 2) + img + text_ids(rng, 3) + img + [5]]
    ids, mask = padded_batch(rows, "left")
    pix = pixels(rng, 3)
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                pixel_values=torch.tensor(pix), max_new_tokens=20, do_sample=False,
                                eos_token_id=CFG.eos_token_id[0], pad_token_id=CFG.pad_token_id)
    ref = ref[:, ids.shape[1]:].numpy()
    ours = model.generate(ids, pix, mask, max_new_tokens=20, eos_token_id=CFG.eos_token_id,
                          pad_token_id=CFG.pad_token_id)
    assert ours.shape == (2, 20)
    # HF stops early once every row has emitted EOS; the remaining slots are padding
    ref = np.pad(ref, ((0, 0), (0, 20 - ref.shape[1])), constant_values=CFG.pad_token_id)
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ours)) > 3  # not a degenerate constant stream


# --------------------------------------------------------------------------------------------
# Block-by-block interface, modality mask, bfloat16
# --------------------------------------------------------------------------------------------


def test_block_by_block_equals_whole(model):
    rng = rng_for("blocks")
    ids, mask = padded_batch([text_ids(rng, 2) + [CFG.image_token_id] * N_IMG + text_ids(rng, 3),
                              text_ids(rng, 5)], "left")
    pix = pixels(rng, 1)
    emb = model.embed(ids, pix, mask)
    np.testing.assert_array_equal(np.asarray(emb.modality_mask),
                                  [[TEXT] * 2 + [VISION] * N_IMG + [TEXT] * 3,
                                   [PAD] * 4 + [TEXT] * 5])
    np.testing.assert_array_equal(np.asarray(emb.position_ids)[1], [0] * 4 + list(range(5)))
    cos, sin = model.rope(emb.position_ids)
    attn = model.attention_mask(emb.modality_mask)
    assert attn.shape == (2, 9, 9) and not bool(attn[1, :, :4].any())  # nobody attends to padding
    x = emb.hidden
    run = nnx.jit(lambda block, x, cos, sin, attn: block(x, cos, sin, attn))  # one compile for all blocks
    for block in model.blocks:
        x = run(block, x, cos, sin, attn)
    stepwise = np.asarray(model.head(x))
    whole = np.asarray(model(ids, pix, mask))
    assert np.abs(stepwise - whole)[mask == 1].max() < 1e-5


def test_bfloat16_tracks_float32(hf_dir, model):
    bf16, _ = load_llava(hf_dir, dtype=jnp.bfloat16)
    leaves = jax.tree.leaves(jax.tree.map(lambda a: a.dtype, nnx.state(bf16)))
    assert set(leaves) == {jnp.dtype(jnp.bfloat16)}
    rng = rng_for("bf16")
    ids = np.array([text_ids(rng, 4) + [CFG.image_token_id] * N_IMG + text_ids(rng, 6)])
    pix = pixels(rng, 1)
    ref = np.asarray(model(ids, pix))
    low = np.asarray(bf16(ids, pix).astype(jnp.float32))
    err = np.abs(low - ref).max() / np.abs(ref).max()
    assert err < 0.05, err
    assert (low.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_embed_rejects_image_token_mismatch(model):
    rng = rng_for("mismatch")
    ids = np.array([text_ids(rng, 2) + [CFG.image_token_id] * N_IMG])
    with pytest.raises(ValueError, match="image tokens"):
        model(ids)  # placeholders but no pixels
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixels(rng, 2))  # one image's placeholders, two images


# --------------------------------------------------------------------------------------------
# Converter: spellings, shards, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,path", [
    ("language_model.model.layers.3.self_attn.q_proj.weight", ("language_model", "layers", 3, "self_attn", "q_proj", "w")),
    ("model.language_model.layers.3.mlp.down_proj.weight", ("language_model", "layers", 3, "mlp", "down_proj", "w")),
    ("language_model.model.norm.weight", ("language_model", "norm", "scale")),
    ("language_model.lm_head.weight", ("language_model", "lm_head", "w")),
    ("lm_head.weight", ("language_model", "lm_head", "w")),
    ("model.language_model.embed_tokens.weight", ("language_model", "embed_tokens", "weight")),
    ("vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.bias", ("vision_tower", "layers", 0, "self_attn", "out_proj", "b")),
    ("vision_tower.encoder.layers.1.layer_norm2.weight", ("vision_tower", "layers", 1, "layer_norm2", "scale")),
    ("model.vision_tower.vision_model.pre_layrnorm.bias", ("vision_tower", "pre_layrnorm", "bias")),
    ("model.vision_tower.embeddings.patch_embedding.weight", ("vision_tower", "patch_embedding")),
    ("vision_tower.vision_model.embeddings.class_embedding", ("vision_tower", "class_embedding")),
    ("multi_modal_projector.linear_2.bias", ("multi_modal_projector", "linear_2", "b")),
    ("model.multi_modal_projector.linear_1.weight", ("multi_modal_projector", "linear_1", "w")),
    ("model.layers.0.self_attn.q_proj.weight", None),  # a bare Llama checkpoint is not LLaVA
    ("visual.blocks.0.attn.qkv.weight", None),
])
def test_map_key_spellings(key, path):
    assert map_key(key) == path


def _flat_params(m) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def _write(dir_, tensors: dict, config: dict, shards: int = 1):
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(dir_ / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(dir_ / file))
        weight_map.update({k: file for k in part})
    (dir_ / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def saved(hf_dir):
    return load_file(str(hf_dir / "model.safetensors")), json.loads((hf_dir / "config.json").read_text())


def test_hub_spelling_in_shards_and_in_memory_spelling_load_identically(tmp_path, model, hf_model, saved):
    tensors, config = saved
    want = _flat_params(model)
    # llava-hf's hub files: vision_tower.vision_model.*, sharded in three files
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    hub["vision_tower.vision_model.embeddings.position_ids"] = np.arange(5)[None]  # old buffer, ignored
    _write(tmp_path / "hub", hub, config, shards=3)
    # transformers-5 in-memory names (model.language_model.*, model.vision_tower.*, lm_head)
    memory = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in memory) and "lm_head.weight" in memory
    _write(tmp_path / "memory", memory, config)
    for name in ("hub", "memory"):
        got = _flat_params(load_llava(tmp_path / name)[0])
        assert got.keys() == want.keys()
        for p in want:
            np.testing.assert_array_equal(got[p], want[p], err_msg=f"{name}: {p}")


def test_hub_config_json_gives_the_named_config():
    # llava-hf/llava-1.5-7b-hf's config.json (transformers 4.36 layout): text_config lists only
    # what differs from Llama defaults, vision_config only what differs from CLIP defaults.
    hub = {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
           "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
           "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                           "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                           "torch_dtype": "float16", "vocab_size": 32064},
           "tie_word_embeddings": False, "torch_dtype": "float16",
           "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                             "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                             "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
           "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}
    cfg = LlavaConfig.from_hf(hub, hf_id="llava-hf/llava-1.5-7b-hf")
    assert cfg == get_config("llava-1.5-7b")
    assert cfg.num_image_tokens == 576
    thirteen = json.loads(json.dumps(hub))
    thirteen["text_config"].update(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                                   num_hidden_layers=40, num_key_value_heads=40)
    assert LlavaConfig.from_hf(thirteen, hf_id="llava-hf/llava-1.5-13b-hf") == get_config("llava-1.5-13b")


def test_param_counts_of_real_configs():
    # Published sizes: LLaVA-1.5-7B about 7.06 B, 13B about 13.35 B parameters.
    models = {name: abstract_model(get_config(name)) for name in ("llava-1.5-7b", "llava-1.5-13b")}
    counts = {name: m.num_params() for name, m in models.items()}
    print("parameter counts:", counts)
    assert abs(counts["llava-1.5-7b"] / 7.06e9 - 1) < 0.005
    assert abs(counts["llava-1.5-13b"] / 13.35e9 - 1) < 0.005
    # the Llama decoders alone are Llama-2-7B/13B plus 64 extra vocabulary rows on each side
    m7 = models["llava-1.5-7b"]
    assert count_params(m7.language_model) == 6_738_415_616 + 2 * 64 * 4096
    # CLIP ViT-L/14 at 336 px, from its shapes: patch conv, class token, 577 positions, two outer
    # LayerNorms, 24 blocks of (4 biased d x d projections, 2 LayerNorms, biased d-I-d MLP)
    d, i = 1024, 4096
    block = 4 * (d * d + d) + 2 * 2 * d + (d * i + i) + (i * d + d)
    assert count_params(m7.vision_tower) == 3 * 14 * 14 * d + d + 577 * d + 2 * 2 * d + 24 * block


def test_converter_errors(tmp_path, hf_dir, saved):
    tensors, config = saved
    with pytest.raises(ConversionError, match="does not exist"):
        load_llava(tmp_path / "nowhere")
    # a shard listed in the index is missing
    _write(tmp_path / "sharded", tensors, config, shards=2)
    (tmp_path / "sharded" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="missing"):
        load_llava(tmp_path / "sharded")
    # truncated file
    (tmp_path / "trunc").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "trunc")
    data = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="corrupted|truncated"):
        load_llava(tmp_path / "trunc")
    # pickle checkpoints are refused
    (tmp_path / "pickle").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "pickle")
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    with pytest.raises(ConversionError, match="pickle"):
        load_llava(tmp_path / "pickle")
    # wrong architecture
    _write(tmp_path / "qwen", tensors, {**config, "architectures": ["Qwen2_5_VLForConditionalGeneration"]})
    with pytest.raises(ConversionError, match="unsupported architecture"):
        load_llava(tmp_path / "qwen")
    # a weight missing
    _write(tmp_path / "partial", {k: v for k, v in tensors.items() if "linear_2.bias" not in k}, config)
    with pytest.raises(ConversionError, match="missing.*linear_2"):
        load_llava(tmp_path / "partial")
    # both spellings of one weight
    dup = dict(tensors)
    dup["model.multi_modal_projector.linear_1.bias"] = tensors["multi_modal_projector.linear_1.bias"]
    _write(tmp_path / "dup", dup, config)
    with pytest.raises(ConversionError, match="two key spellings"):
        load_llava(tmp_path / "dup")
    # config.json disagrees with the weights
    bad = json.loads(json.dumps(config))
    bad["text_config"]["intermediate_size"] += 8
    _write(tmp_path / "shape", tensors, bad)
    with pytest.raises(ConversionError, match="shape"):
        load_llava(tmp_path / "shape")
    # a foreign tensor
    _write(tmp_path / "foreign", {**tensors, "something.else.weight": np.zeros(3, np.float32)}, config)
    with pytest.raises(ConversionError, match="not LLaVA weights"):
        load_llava(tmp_path / "foreign")


def test_gradient_pass_matches_torch_autograd(model, hf_model):
    """dL/dy of the answer loss at v_proj, o_proj and down_proj of every layer equals torch
    autograd of the HF model on the same weights and inputs (an image, a question, an answer)."""
    from gradient_reference import assert_gradients_match

    rng = rng_for("gradients")
    ids = np.array([text_ids(rng, 3) + [CFG.image_token_id] * N_IMG + text_ids(rng, 4) + text_ids(rng, 5)])
    modality = np.where(ids == CFG.image_token_id, 2, 1)
    modality[:, -5:] = 3
    pix = pixels(rng, 1)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pix, "modality": modality}
    kw = {"input_ids": torch.tensor(ids), "pixel_values": torch.tensor(pix)}
    assert_gradients_match(model, "llava", batch, hf_model, hf_model.model.language_model.layers, kw)
