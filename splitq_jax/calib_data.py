"""Calibration and evaluation data: samples, their tokens with answer spans, and padded batches.

Data flow::

    "default" ──bundled_samples──┐
    file.jsonl ──load_jsonl──────┴─▶ [Sample] ──encode_samples──▶ [EncodedSample] ──make_batches──▶ [batch dict]

A :class:`Sample` is one image, the user's question and an optional answer. ``encode_samples``
applies the model family's chat template (``preprocess.qwen_chat_prompt`` / ``llava_chat_prompt``)
and marks every position with a modality code: ``PAD`` 0, ``TEXT`` 1, ``VISION`` 2 and ``ANSWER``
3 for the answer's own tokens, whose index range is kept for evaluation (answer perplexity, exact
match).

The bundled default set is built only from real assets that install offline
(``/work/shared/design/data-assets.md``):

- easy-vqa 1.0 (MIT): 64×64 images of one coloured shape with short questions and one-word answers
  (13 possible). Read straight out of its PyPI wheel (fetched once into ``$SPLITQ_CACHE/wheels``,
  sha256-checked, never installed or imported).
- the real photographs bundled with scikit-image (astronaut, coffee, rocket, ...), each with a
  generic captioning prompt and no answer.

Calibration draws from easy-vqa's *train* split and one set of photographs, evaluation from its
*test* split and a disjoint set of photographs, so evaluation never sees a calibration image.
By default a quarter of the samples are photographs and three quarters easy-vqa questions
(``photo_fraction``); the two are shuffled together. Everything is a pure function of ``seed``.

For text-only code models (``qwen2.5-coder-0.5b``) :func:`stdlib_code_samples` gives windows of
token ids of real Python source: this interpreter's standard library, calibration and evaluation
drawn from two fixed, disjoint file lists (``STDLIB_CALIB_FILES`` / ``STDLIB_EVAL_FILES``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from splitq_jax import assets
from splitq_jax import preprocess as pp
from splitq_jax.modality import ANSWER, PAD, TEXT, VISION  # noqa: F401  (re-exported codes)
from splitq_jax.errors import SplitqError
from splitq_jax.models.family import CHECKPOINT_FAMILIES, family_of

# Text that is part of an answer; counts as text everywhere (splitq_jax.calibrate uses the same code).

FAMILIES = CHECKPOINT_FAMILIES  # the family names encode_samples takes (models.family has the facts)
DEFAULT_SOURCE = "default"
DEFAULT_NUM_SAMPLES = 128
DEFAULT_PHOTO_FRACTION = 0.25
SPLITS = ("calib", "eval")


class CalibDataError(SplitqError):
    """Calibration or evaluation data that cannot be used; the message names the file and line."""


# ------------------------------------------------------------------------------ samples


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Sample:
    """One image with a question and an optional answer.

    image: RGB ``uint8`` ``(H, W, 3)``; prompt: the user's question, without any chat template;
    answer: the reference answer or ``None``; source: where it came from
    (``easy-vqa/train/17#142``: split, image id, question index; ``skimage/astronaut``;
    ``path/to/data.jsonl:3``).
    """

    image: np.ndarray
    prompt: str
    answer: str | None = None
    source: str = ""


# ------------------------------------------------------------------------ easy-vqa wheel

EASY_VQA_WHEEL = "easy-vqa==1.0"
EASY_VQA_WHEEL_FILE = "easy_vqa-1.0-py3-none-any.whl"
EASY_VQA_WHEEL_SHA256 = "fcb51b309b78c7b00f97b64cdbcbcf5c105f94da1b39c0796cee5a787c4f650f"
_EASY_VQA_DATA = "easy_vqa/data/"
# LLaVA-1.5's short-answer VQA instruction, so that exact match on one-word answers is meaningful.
VQA_INSTRUCTION = "Answer the question using a single word or phrase."


def easy_vqa_wheel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified easy-vqa 1.0 wheel, fetched into ``<cache>/wheels`` on first use."""
    root = Path(cache_dir) if cache_dir is not None else assets.default_cache_dir()
    return assets.fetch_wheel(EASY_VQA_WHEEL, EASY_VQA_WHEEL_FILE, EASY_VQA_WHEEL_SHA256, root / "wheels")


def _easy_vqa_split(zf: zipfile.ZipFile, split: str) -> list[tuple[str, str, int]]:
    """``(question, answer, image_id)`` triples of easy-vqa's ``train`` or ``test`` split, in file order."""
    return [(q, a, int(i)) for q, a, i in json.loads(zf.read(f"{_EASY_VQA_DATA}{split}/questions.json"))]


def _easy_vqa_image(zf: zipfile.ZipFile, split: str, image_id: int) -> np.ndarray:
    with Image.open(io.BytesIO(zf.read(f"{_EASY_VQA_DATA}{split}/images/{image_id}.png"))) as im:
        return pp.load_image(im)


# ------------------------------------------------------------------------ photographs

# scikit-image's bundled real photographs (no downloads), split once and for all: calibration
# never sees an evaluation photo. Synthetic images and drawings (horse, logo, ...) are left out.
CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "camera", "coins", "hubble_deep_field",
                "immunohistochemistry", "page", "brick", "grass", "clock", "stereo_motorcycle")
EVAL_PHOTOS = ("chelsea", "moon", "retina", "text", "gravel", "cell")
PHOTO_PROMPTS = ("Describe this image.", "What is shown in this picture?",
                 "Describe this image in detail.", "What are the main objects in this image?")


def photograph(name: str) -> np.ndarray:
    """One of the bundled photographs (``CALIB_PHOTOS`` / ``EVAL_PHOTOS``) as RGB uint8 ``(H, W, 3)``."""
    from skimage import data as skdata

    image = getattr(skdata, name)()
    if name == "stereo_motorcycle":  # (left, right, disparity)
        image = image[0]
    return pp.load_image(image)


# ------------------------------------------------------------------------ bundled set


def bundled_samples(n: int = DEFAULT_NUM_SAMPLES, *, split: str = "calib", seed: int = 0,
                    photo_fraction: float = DEFAULT_PHOTO_FRACTION,
                    cache_dir: str | os.PathLike | None = None) -> list[Sample]:
    """``n`` samples of the bundled set, a pure function of ``(n, split, seed, photo_fraction)``.

    ``split="calib"`` draws from easy-vqa *train* and ``CALIB_PHOTOS``; ``split="eval"`` from
    easy-vqa *test* and ``EVAL_PHOTOS``. ``round(n * photo_fraction)`` samples are photographs
    (no answer), the rest easy-vqa questions (with their answer). easy-vqa questions go to
    distinct images first (4,000 train / 1,000 test images); photographs cycle through
    photo × prompt pairs, each photo once per round, so they repeat only past
    ``len(photos) * len(PHOTO_PROMPTS)`` photo samples (48 calib, 24 eval).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 1:
        raise CalibDataError(f"asked for {n} samples; need at least one")
    if not 0.0 <= photo_fraction <= 1.0:
        raise ValueError(f"photo_fraction must lie in [0, 1], got {photo_fraction}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    n_photo = int(round(n * photo_fraction))
    n_vqa = n - n_photo
    vqa_split = "train" if split == "calib" else "test"

    with zipfile.ZipFile(easy_vqa_wheel(cache_dir)) as zf:
        questions = _easy_vqa_split(zf, vqa_split)
        if n_vqa > len(questions):
            raise CalibDataError(f"asked for {n_vqa} easy-vqa samples; its {vqa_split} split has {len(questions)}")
        by_image: dict[int, list[int]] = {}
        for qi, (_, _, image_id) in enumerate(questions):
            by_image.setdefault(image_id, []).append(qi)
        image_ids = sorted(by_image)
        image_order = rng.permutation(len(image_ids))
        # Each image's questions in a random order; round r takes every image's r-th question.
        question_order = {i: rng.permutation(by_image[i]) for i in image_ids}
        vqa = []
        k = 0
        while len(vqa) < n_vqa:  # ends: n_vqa <= len(questions), and every question comes up once
            r, j = divmod(k, len(image_ids))
            k += 1
            image_id = image_ids[image_order[j]]
            if r < len(question_order[image_id]):  # else this image is out of questions this round
                qi = int(question_order[image_id][r])
                q, a, _ = questions[qi]
                vqa.append((vqa_split, image_id, qi, q, a))
        images = {iid: _easy_vqa_image(zf, vqa_split, iid) for _, iid, _, _, _ in vqa}
    vqa_samples = [Sample(image=images[iid], prompt=f"{q}\n{VQA_INSTRUCTION}", answer=a,
                          source=f"easy-vqa/{s}/{iid}#{qi}") for s, iid, qi, q, a in vqa]

    photos = CALIB_PHOTOS if split == "calib" else EVAL_PHOTOS
    photo_order = rng.permutation(len(photos))
    prompt_offset = rng.integers(len(PHOTO_PROMPTS), size=len(photos))
    loaded: dict[str, np.ndarray] = {}
    photo_samples = []
    for k in range(n_photo):
        r, j = divmod(k, len(photos))
        p = int(photo_order[j])
        name = photos[p]
        if name not in loaded:
            loaded[name] = photograph(name)
        prompt = PHOTO_PROMPTS[(prompt_offset[p] + r) % len(PHOTO_PROMPTS)]
        photo_samples.append(Sample(image=loaded[name], prompt=prompt, answer=None, source=f"skimage/{name}"))

    is_photo = np.zeros(n, bool)
    is_photo[rng.permutation(n)[:n_photo]] = True
    vqa_it, photo_it = iter(vqa_samples), iter(photo_samples)
    return [next(photo_it) if p else next(vqa_it) for p in is_photo]


# ------------------------------------------------------------------------------ JSONL

JSONL_KEYS = ("image", "prompt", "answer", "id")


def load_jsonl(path: str | os.PathLike, *, n: int | None = None, seed: int = 0) -> list[Sample]:
    """Samples from a JSONL file, one ``{"image": ..., "prompt": ..., "answer": ...}`` per line.

    ``image`` is a path, relative to the file's directory unless absolute; ``answer`` (optional)
    and ``id`` (optional, used as the sample's source) are strings. Blank lines are skipped.
    Every image is decoded here, so a bad file fails before any model work. ``n=None`` keeps all
    samples in file order; otherwise a seeded random subset of ``n``.
    Raises :class:`CalibDataError` naming the file and line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CalibDataError(f"{path}: cannot read data: {e.strerror or e}") from e
    if not raw:
        raise CalibDataError(f"{path}: file is empty; expected one JSON object per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    samples = []
    # Split on "\n" only: JSON strings may hold raw U+2028 etc., which str.splitlines would cut at.
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            samples.append(_jsonl_sample(line, path, lineno))
    if not samples:
        raise CalibDataError(f"{path}: no samples (only blank lines)")
    if n is None:
        return samples
    if not 1 <= n <= len(samples):
        raise CalibDataError(f"{path}: asked for {n} samples; the file has {len(samples)}")
    order = np.random.default_rng(seed).permutation(len(samples))[:n]
    return [samples[i] for i in order]


def _jsonl_sample(line: str, path: Path, lineno: int) -> Sample:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CalibDataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise CalibDataError(f"{where}: expected a JSON object with keys 'image', 'prompt' and optionally "
                             f"'answer', got {type(obj).__name__}")
    missing = [k for k in ("image", "prompt") if k not in obj]
    if missing:
        raise CalibDataError(f"{where}: missing key(s) {missing}; each line needs 'image' and 'prompt'")
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:  # most often a typo ("answers") that would silently drop data
        raise CalibDataError(f"{where}: unknown key(s) {unknown}; allowed: {list(JSONL_KEYS)}")
    for key in ("image", "prompt"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise CalibDataError(f"{where}: {key!r} must be a non-empty string, got {obj[key]!r}")
    answer = obj.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise CalibDataError(f"{where}: 'answer' must be a non-empty string or absent, got {answer!r}")
    image_path = Path(obj["image"])
    if not image_path.is_absolute():
        image_path = path.parent / image_path
    if not image_path.is_file():
        raise CalibDataError(f"{where}: image {str(image_path)!r} does not exist or is not a file")
    try:
        image = pp.load_image(image_path)
    except ValueError as e:
        raise CalibDataError(f"{where}: {e}") from None
    return Sample(image=image, prompt=obj["prompt"], answer=answer, source=str(obj.get("id") or where))


def load_samples(source: str | os.PathLike = DEFAULT_SOURCE, *, n: int | None = None, split: str = "calib",
                 seed: int = 0, photo_fraction: float = DEFAULT_PHOTO_FRACTION,
                 cache_dir: str | os.PathLike | None = None) -> list[Sample]:
    """What ``--calib-data`` names: ``"default"`` (the bundled set, ``n`` defaults to 128) or a JSONL
    file (``split`` and ``photo_fraction`` do not apply; give a separate file for evaluation)."""
    if str(source) == DEFAULT_SOURCE:
        return bundled_samples(DEFAULT_NUM_SAMPLES if n is None else n, split=split, seed=seed,
                               photo_fraction=photo_fraction, cache_dir=cache_dir)
    return load_jsonl(source, n=n, seed=seed)


# ------------------------------------------------------------------------------ encoding


def qwen_image_budget(*, min_tokens: int = 64, max_tokens: int = 256, patch_size: int = 14, merge_size: int = 2,
                      temporal_patch_size: int = 2) -> pp.QwenImageConfig:
    """Qwen2.5-VL preprocessing that gives every image between ``min_tokens`` and ``max_tokens`` LLM
    tokens (one per ``(patch_size * merge_size)²`` pixels), via ``min_pixels`` / ``max_pixels``.

    The patch geometry must be the model's vision config (``patch_size``, ``spatial_merge_size``,
    ``temporal_patch_size``); the defaults are the released models'.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    factor = patch_size * merge_size
    return pp.QwenImageConfig(min_pixels=min_tokens * factor ** 2, max_pixels=max_tokens * factor ** 2,
                              patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)


# The default for small models: easy-vqa's 64×64 images become 224×224 (64 tokens), photographs at
# most 256 tokens, so a sample is about 100–300 tokens with the chat template.
DEFAULT_QWEN_IMAGE_CFG = qwen_image_budget(min_tokens=64, max_tokens=256)


@dataclasses.dataclass
class EncodedSample(pp.Encoded):
    """``preprocess.Encoded`` plus the answer: ``input_ids[answer_start:answer_end]`` are its tokens
    (modality ``ANSWER``), an empty range when the sample has no answer. Template tokens after the
    answer (Qwen's ``<|im_end|>``) stay ``TEXT``."""

    answer_start: int = 0
    answer_end: int = 0
    answer: str | None = None
    source: str = ""


# LLaVA-family models with a DINOv2 tower and Qwen chat prompts (``easyvqa-vlm-0.5b``): 224 px,
# ImageNet mean/std, 16x16 patches pooled 2x2 = 64 image tokens. Used when such a model's image
# config is not given (see :func:`llava_prompt_format`).
def _default_dinov2_llava_image_cfg():
    from splitq_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD
    from splitq_jax.models.llava import PooledImageConfig

    return PooledImageConfig(shortest_edge=224, crop_size=224, patch_size=14, image_mean=IMAGENET_MEAN,
                             image_std=IMAGENET_STD, pool=2)


def llava_prompt_format(tokenizer, model_config=None) -> str:
    """``"llava"`` or ``"qwen"``: the prompt layout of a LLaVA-family model, from its config
    (``LlavaConfig.prompt_format``) or, without one, from its tokenizer (a Qwen tokenizer has
    ``<|image_pad|>`` and no ``<image>``)."""
    if model_config is not None:
        return getattr(model_config, "prompt_format", "llava")
    vocab = tokenizer.get_vocab()
    return "qwen" if pp.QWEN_IMAGE_TOKEN in vocab and pp.LLAVA_IMAGE_TOKEN not in vocab else "llava"


def encode_samples(samples: Sequence[Sample], family: str, tokenizer,
                   image_cfg: pp.QwenImageConfig | pp.LlavaImageConfig | None = None, *,
                   system: str | None = pp.QWEN_DEFAULT_SYSTEM, model_config=None) -> list[EncodedSample]:
    """Chat-format, tokenize and preprocess samples for ``family`` (``"qwen2_5_vl"`` or ``"llava"``).

    ``image_cfg`` defaults to ``DEFAULT_QWEN_IMAGE_CFG`` for Qwen2.5-VL and to ``LlavaImageConfig()``
    (576 tokens an image) for LLaVA; ``system`` is Qwen's system prompt (``None``: none).
    The answer, when given, follows the assistant prefix; its tokens get ``ANSWER``.

    LLaVA models with Qwen prompts (``LlavaConfig.prompt_format == "qwen"``, the DINOv2 variant)
    use Qwen's chat template with ``<|vision_start|>`` + ``num_image_tokens`` x ``<|image_pad|>`` +
    ``<|vision_end|>`` per image and LLaVA-style pixel values. ``model_config`` (a ``LlavaConfig``)
    gives their format and image config (``image_processor()``); without it both follow the
    tokenizer (:func:`llava_prompt_format`) with easyvqa-vlm-0.5b's image config.
    """
    fam = family_of(family, model_config)  # unknown names raise here, before anything else
    if not samples:
        raise CalibDataError("no samples to encode")
    want = getattr(pp, fam.image_config)
    fmt = fam.prompt_format or llava_prompt_format(tokenizer, model_config)
    if image_cfg is None:
        if fam.takes_grid:
            image_cfg = DEFAULT_QWEN_IMAGE_CFG
        elif model_config is not None and hasattr(model_config, "image_processor"):
            image_cfg = model_config.image_processor()
        else:
            image_cfg = _default_dinov2_llava_image_cfg() if fmt == "qwen" else pp.LlavaImageConfig()
    if not isinstance(image_cfg, want):
        raise ValueError(f"family {family!r} needs a {want.__name__}, got {type(image_cfg).__name__}")
    return [_encode_one(s, fmt, fam.takes_grid, tokenizer, image_cfg, system) for s in samples]


def _encode_one(sample: Sample, fmt: str, grid: bool, tokenizer, cfg, system: str | None) -> EncodedSample:
    """One sample in chat format ``fmt`` ("qwen" / "llava"); ``grid``: Qwen2.5-VL's image input
    (patches + ``image_grid_thw``, a token count per image size) rather than fixed-size pixels."""
    answer = sample.answer
    if grid:
        prompt = pp.qwen_chat_prompt(sample.prompt, 1, system=system)
        full = pp.qwen_chat_prompt(sample.prompt, 1, system=system, answer=answer)
        enc = pp.qwen_encode(tokenizer, full, [sample.image], cfg)
        image_token, add_special = pp.QWEN_IMAGE_TOKEN, False
        counts = [pp.qwen_num_image_tokens(g, cfg) for g in enc.image_grid_thw]
    elif fmt == "qwen":  # LLaVA-family model (DINOv2 variant) with Qwen chat prompts
        prompt = pp.qwen_chat_prompt(sample.prompt, 1, system=system)
        full = pp.qwen_chat_prompt(sample.prompt, 1, system=system, answer=answer)
        image_token, add_special = pp.QWEN_IMAGE_TOKEN, False
        counts = [cfg.num_image_tokens]
        ids, mod = pp._tokenize(tokenizer, pp.expand_image_tokens(full, image_token, counts),
                                tokenizer.convert_tokens_to_ids(image_token), add_special_tokens=False)
        enc = pp.Encoded(ids, mod, pp.llava_preprocess_images([sample.image], cfg), None)
    else:
        prompt = pp.llava_chat_prompt(sample.prompt, 1)
        full = pp.llava_chat_prompt(sample.prompt, 1, answer=answer)
        enc = pp.llava_encode(tokenizer, full, [sample.image], cfg)
        image_token, add_special = pp.LLAVA_IMAGE_TOKEN, True
        counts = [cfg.num_image_tokens]
    start = end = len(enc.input_ids)
    modality = enc.modality
    if answer is not None:
        # The answer's tokens are those the full text has beyond the prompt, up to the answer's end;
        # both must tokenize as prefixes of the full text, or the boundary merged into one token.
        upto = full[:full.index(answer, len(prompt)) + len(answer)]

        def tokens(text: str) -> np.ndarray:
            expanded = pp.expand_image_tokens(text, image_token, counts)
            return np.asarray(tokenizer(expanded, add_special_tokens=add_special)["input_ids"], np.int32)

        prefix, with_answer = tokens(prompt), tokens(upto)
        start, end = len(prefix), len(with_answer)
        if (not np.array_equal(enc.input_ids[:start], prefix) or not np.array_equal(enc.input_ids[:end], with_answer)
                or end <= start):
            raise CalibDataError(f"{sample.source}: the answer {answer!r} does not tokenize apart from the "
                                 f"chat template around it")
        modality = modality.copy()
        modality[start:end] = ANSWER
    return EncodedSample(enc.input_ids, modality, enc.pixel_values, enc.image_grid_thw,
                         answer_start=start, answer_end=end, answer=answer, source=sample.source)


# ------------------------------------------------------------------------------ batching


def make_batches(encoded: Sequence[EncodedSample], batch_size: int, pad_id: int, padding_side: str = "left", *,
                 max_tokens: int | None = None) -> list[dict[str, np.ndarray]]:
    """Consecutive groups of ``batch_size`` samples (the last may be smaller), padded by ``preprocess.collate``.

    Each batch: ``input_ids``, ``attention_mask`` ``(B, L)`` int32; ``modality`` ``(B, L)`` int8
    (``PAD`` on padding, ``ANSWER`` on answers); ``answer_mask`` ``(B, L)`` bool; ``pixel_values``
    (Qwen: all patches ``(P, 1176)``; LLaVA: one tensor per image ``(B, 3, S, S)``);
    ``image_grid_thw`` ``(B, 3)`` for Qwen; ``sample_index`` ``(B,)`` int64 into ``encoded``.

    ``max_tokens`` cuts longer samples on the right (an answer loses its tail); it is an error
    when that would cut into a sample's image tokens.
    """
    if not encoded:
        raise CalibDataError("no samples to batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None:
        encoded = [_truncate(s, max_tokens, i) for i, s in enumerate(encoded)]
    batches = []
    for lo in range(0, len(encoded), batch_size):
        group = encoded[lo:lo + batch_size]
        batch = pp.collate(group, pad_id, padding_side=padding_side)
        batch["answer_mask"] = batch["modality"] == ANSWER
        batch["sample_index"] = np.arange(lo, lo + len(group), dtype=np.int64)
        batches.append(batch)
    return batches


# Calibration samples longer than this are refused unless the user sets --max-tokens: FlatQuant and
# SplitQ calibrate on sequences of this order, and memory grows with the square of the length.
DEFAULT_MAX_TOKENS = 2048


def check_lengths(encoded: Sequence[EncodedSample], limit: int = DEFAULT_MAX_TOKENS, *, what: str = "calibration",
                  fix: str = "pass --max-tokens N to cut samples at N tokens (memory grows with N squared)") -> None:
    """Refuse samples longer than ``limit`` tokens, naming the first one's source (``file:line``)."""
    long = [(i, s) for i, s in enumerate(encoded) if len(s.input_ids) > limit]
    if long:
        i, s = long[0]
        name = s.source or f"sample {i}"
        more = f" (and {len(long) - 1} more)" if len(long) > 1 else ""
        raise CalibDataError(f"{name}: the sample is {len(s.input_ids)} tokens long{more}, more than the "
                             f"{limit}-token limit for {what} samples; shorten it, or {fix}")


def _truncate(s: EncodedSample, max_tokens: int, index: int) -> EncodedSample:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    vision = np.flatnonzero(s.modality == VISION)
    name = f"sample {index} ({s.source})" if s.source else f"sample {index}"
    if len(vision) > max_tokens:
        raise CalibDataError(f"{name}: its image alone takes {len(vision)} tokens, more than max_tokens="
                             f"{max_tokens}; lower the image budget (Qwen max_pixels, see qwen_image_budget) "
                             f"or raise max_tokens")
    if len(s.input_ids) <= max_tokens:
        return s
    if len(vision) and vision[-1] >= max_tokens:
        raise CalibDataError(f"{name}: the text before its image and the image take {vision[-1] + 1} tokens, "
                             f"more than max_tokens={max_tokens}")
    return dataclasses.replace(s, input_ids=s.input_ids[:max_tokens], modality=s.modality[:max_tokens],
                               answer_start=min(s.answer_start, max_tokens), answer_end=min(s.answer_end, max_tokens))


# ------------------------------------------------------------------ Python source (text only)

# Real text for a code model (Qwen2.5-Coder, text only): the source files of the Python standard
# library of the interpreter running this code (``sysconfig.get_paths()["stdlib"]``). Two fixed,
# sorted, DISJOINT lists of stable pure-Python modules (all present in CPython 3.11-3.13), paths
# relative to that directory. Evaluation holds json/decoder.py + json/encoder.py, the text of the
# perplexity figures in /work/shared/design/data-assets.md. Contents differ between Python
# versions, so token windows are deterministic for one interpreter version (and tokenizer), not
# across versions.
STDLIB_CALIB_FILES = (
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py", "colorsys.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py",
    "fractions.py", "functools.py", "gettext.py", "heapq.py", "inspect.py", "ipaddress.py", "logging/__init__.py",
    "operator.py", "pprint.py", "queue.py", "random.py", "sched.py", "secrets.py", "selectors.py", "shutil.py",
    "tempfile.py", "threading.py", "tokenize.py", "traceback.py", "types.py", "typing.py", "uuid.py", "weakref.py",
)  # about 1.5 MB of source, ~0.4 M Qwen2.5 tokens
STDLIB_EVAL_FILES = (
    "abc.py", "fnmatch.py", "glob.py", "graphlib.py", "json/__init__.py", "json/decoder.py", "json/encoder.py",
    "keyword.py", "linecache.py", "locale.py", "numbers.py", "optparse.py", "plistlib.py", "reprlib.py", "shlex.py",
    "statistics.py", "string.py", "textwrap.py",
)  # about 0.36 MB of source, ~0.1 M Qwen2.5 tokens


def stdlib_dir() -> Path:
    """This interpreter's standard library directory (``sysconfig.get_paths()["stdlib"]``)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_code_files(split: str = "calib", root: str | os.PathLike | None = None) -> list[Path]:
    """The files of ``split`` (``"calib"``: ``STDLIB_CALIB_FILES``, ``"eval"``: ``STDLIB_EVAL_FILES``)
    under ``root`` (default :func:`stdlib_dir`), in list order; CalibDataError if one is missing."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    base = Path(root) if root is not None else stdlib_dir()
    names = STDLIB_CALIB_FILES if split == "calib" else STDLIB_EVAL_FILES
    paths = [base / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CalibDataError(f"{len(missing)} standard-library source file(s) of the {split!r} list are missing "
                             f"(first: {missing[0]}); this Python installation lacks its .py sources "
                             f"(install the full interpreter, not a stripped one)")
    return paths


def stdlib_code_tokens(paths: Sequence[str | os.PathLike], tokenizer) -> list[np.ndarray]:
    """Token ids (int32) of each file's whole text, no special tokens added."""
    out = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CalibDataError(f"{path}: cannot read source text: {e}") from e
        out.append(np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32))
    return out


CODE_SOURCE = "stdlib"  # --calib-data / --data value: real Python code (text-only models)
DEFAULT_CODE_TOKENS = 512


def code_samples(tokenizer, *, split: str = "calib", n: int = 64, max_tokens: int = DEFAULT_CODE_TOKENS,
                 seed: int = 0) -> list[EncodedSample]:
    """:func:`stdlib_code_samples` windows as encoded samples: every token ``TEXT``, no image, no
    answer; what a text-only model calibrates and is evaluated on (``--calib-data stdlib``)."""
    ids = stdlib_code_samples(split, n, max_tokens, tokenizer, seed)
    return [EncodedSample(input_ids=row, modality=np.full(row.shape, TEXT, np.int8),
                          pixel_values=np.zeros((0,), np.float32), source=f"stdlib:{split}") for row in ids]


def stdlib_code_samples(split: str = "calib", n: int = 64, max_tokens: int = 512, tokenizer=None, seed: int = 0, *,
                        root: str | os.PathLike | None = None) -> np.ndarray:
    """``n`` windows of ``max_tokens`` token ids of real Python code, ``(n, max_tokens)`` int32.

    Each file of the split (:func:`stdlib_code_files`) is tokenized on its own and cut into
    consecutive, non-overlapping windows of ``max_tokens`` tokens (a file's last partial window is
    dropped; windows never span two files). ``n`` windows are drawn without replacement, in an
    order that is a pure function of ``(split, seed)``. Calibration and evaluation windows come
    from disjoint files. ``tokenizer``: a transformers tokenizer (e.g. the model's, from
    ``splitq_jax.models.converters.gguf.load_tokenizer()``). Raises CalibDataError when there are fewer than ``n``
    windows.
    """
    if tokenizer is None:
        raise ValueError("stdlib_code_samples needs the model's tokenizer")
    if n < 1:
        raise CalibDataError(f"asked for {n} samples; need at least one")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    windows = []
    for ids in stdlib_code_tokens(stdlib_code_files(split, root), tokenizer):
        full = len(ids) // max_tokens
        windows.extend(ids[k * max_tokens:(k + 1) * max_tokens] for k in range(full))
    if n > len(windows):
        raise CalibDataError(f"asked for {n} windows of {max_tokens} tokens; the {split!r} standard-library files "
                             f"give {len(windows)}; ask for fewer or shorter windows")
    order = np.random.default_rng([seed, SPLITS.index(split), 7]).permutation(len(windows))[:n]
    return np.stack([windows[i] for i in order]).astype(np.int32)
