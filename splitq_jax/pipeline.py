"""Whole-model calibration: embed the calibration set, then calibrate, fold and pack block by block.

Only one block's activations are alive at a time: the full-precision inputs of block ``i + 1`` are
the full-precision outputs of block ``i`` (FlatQuant), so the stream ``x_0 -> x_1 -> ...`` is carried
forward and never stored whole. With ``block_inputs="quantized"`` a second stream, the outputs of the
already-quantized blocks, is carried beside it and feeds the quantized block (targets stay FP).

Each finished block is written to ``work_dir/block_XXX`` (atomically, by the caller's ``save_block``)
and the calibration key of block ``i`` is ``fold_in(PRNGKey(seed), i)``, so a run resumed after a
crash reproduces an uninterrupted run exactly: finished blocks are loaded, the FP stream is recomputed
through them (cheap), and the quantized stream through their folded form.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import calibrate as cal
from splitq_jax.quantized import fold
from splitq_jax.quantized.fold import canonicalize
from splitq_jax.block import BlockConfig
from splitq_jax.quantized.schema import InferenceSpec, validate_folded_block
from splitq_jax.methods.registry import method_of
from splitq_jax.errors import NonFiniteError
from splitq_jax.finite import check_finite
from splitq_jax.fsutil import write_json
from splitq_jax.models import forward

Tree = dict[str, Any]


def block_config_of(text_cfg) -> BlockConfig:
    """The calibration block shape of a model's decoder (``DecoderConfig``)."""
    return BlockConfig.from_decoder(text_cfg)


@dataclass
class Stream:
    """Everything the blocks of one model see, for all calibration samples at once.

    x: (S, N, d) block input; cos, sin: (S, N, hd); mask: (S, N, N) bool; modality: (S, N) int.
    When blocks attend differently (Qwen2.5-VL's vision tower: windowed or full), ``masks`` holds
    each kind and ``block_masks`` names the kind of every block; ``mask_for(i)`` picks.
    """

    x: jax.Array
    cos: jax.Array
    sin: jax.Array
    mask: jax.Array
    modality: jax.Array
    masks: dict[str, jax.Array] | None = None
    block_masks: tuple[str, ...] | None = None
    # (S, N) int32 token ids, left-padded like the rest (the gradient pass's targets); None: not kept.
    input_ids: jax.Array | None = None

    def mask_for(self, block: int) -> jax.Array:
        return self.mask if self.block_masks is None else self.masks[self.block_masks[block]]


def _left_pad(a: np.ndarray, n: int, value) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[1] = (n - a.shape[1], 0)
    return np.pad(a, pad, constant_values=value)


def embed_batches(model, batches: Sequence[dict], family: str, *, vision_encoder=None) -> Stream:
    """Embed every batch with the model and left-pad them to one common length.

    A batch is a dict of numpy arrays (``splitq_jax.calib_data.make_batches``): ``input_ids``,
    ``attention_mask``, ``pixel_values`` (+ ``image_grid_thw`` for Qwen2.5-VL) and optionally
    ``modality`` (codes 0 pad, 1 text, 2 vision, 3 answer), which overrides the model's own mask
    so that answer tokens keep their code. ``vision_encoder`` replaces the model's vision tower
    (the family ``embed``'s argument: the quantized tower for quantized block inputs).
    """
    if not batches:
        raise ValueError("no calibration batches: give at least one sample")
    parts = []
    for b in batches:
        inp = forward.prepare(model, family, b, vision_encoder=vision_encoder)
        parts.append((np.asarray(inp.hidden, np.float32), np.asarray(inp.cos, np.float32),
                      np.asarray(inp.sin, np.float32), np.asarray(inp.modality, np.int32),
                      np.asarray(b["input_ids"], np.int32)))
    n = max(p[0].shape[1] for p in parts)
    x = np.concatenate([_left_pad(p[0], n, 0.0) for p in parts])
    cos = np.concatenate([_left_pad(p[1], n, 1.0) for p in parts])
    sin = np.concatenate([_left_pad(p[2], n, 0.0) for p in parts])
    modality = np.concatenate([_left_pad(p[3], n, cal.PAD) for p in parts])
    ids = np.concatenate([_left_pad(p[4], n, 0) for p in parts])
    mask = model.attention_mask(jnp.asarray(modality))
    return Stream(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin), jnp.asarray(mask), jnp.asarray(modality),
                  input_ids=jnp.asarray(ids))


@dataclass
class BlockReport:
    index: int
    init_loss: float
    final_loss: float
    seconds: float
    resumed: bool = False
    channels: dict[str, dict[str, int]] = field(default_factory=dict)
    part: str = "language"  # "language" (decoder blocks) or "vision" (vision-tower blocks)


@dataclass
class ModelResult:
    folded_blocks: list[Tree]
    reports: list[BlockReport]
    # The record of the method's whole-model pass (MBQ, TLQ; for the manifest), if it has one.
    model_pass: dict | None = None


def quantize_decoder(
    model,
    stream: Stream,
    cfg: Any,
    *,
    work_dir: str | Path | None = None,
    save_block: Callable[[Path, Tree], None] | None = None,
    load_block: Callable[[Path], Tree] | None = None,
    resume: bool = False,
    fail_after_block: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_block: Callable[[BlockReport], None] | None = None,
    x_quant: jax.Array | None = None,
    on_model_pass: Callable[[int, int], None] | None = None,
) -> ModelResult:
    """Quantize every decoder block of ``model`` on ``stream`` with ``cfg``'s method (a method
    config or an engine setting); returns the folded blocks.

    Args:
      work_dir: where finished blocks are kept for ``resume`` (with ``save_block`` / ``load_block``).
      fail_after_block: test hook: raise after that block has been saved (simulates a crash).
      on_step: ``(block, step, loss)`` after every optimiser step; on_block: after every block.
      x_quant: with ``block_inputs="quantized"``, the first block's quantized-stream input when it
        differs from ``stream.x`` (embeddings with the quantized vision tower's features).
      on_model_pass: ``(done, total)`` during the method's whole-model pass before block 0
        (:meth:`~splitq_jax.methods.base.Method.model_pass`: MBQ's and TLQ's gradients), whose
        per-block results reach the method's ``calibrate_block``; it is saved in ``work_dir`` and
        reused on ``resume``.
    """
    blocks = list(model.blocks)
    pre = method_of(cfg).model_pass(model, stream, cfg, work_dir=work_dir, resume=resume, on_sample=on_model_pass)
    result = quantize_blocks([layer.block_params for layer in blocks], block_config_of(model.config.text), stream,
                             cfg, work_dir=work_dir, save_block=save_block, load_block=load_block, resume=resume,
                             fail_after_block=fail_after_block, on_step=on_step, on_block=on_block, x_quant=x_quant,
                             contexts=None if pre is None else pre.contexts)
    return dataclasses.replace(result, model_pass=None if pre is None else pre.record)


def quantize_blocks(
    params_of: Sequence[Callable[[], Tree]],
    bcfg,
    stream: Stream,
    cfg: Any,
    *,
    part: str = "language",
    work_dir: str | Path | None = None,
    save_block: Callable[[Path, Tree], None] | None = None,
    load_block: Callable[[Path], Tree] | None = None,
    resume: bool = False,
    fail_after_block: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_block: Callable[[BlockReport], None] | None = None,
    x_quant: jax.Array | None = None,
    contexts: Sequence[Any] | None = None,
) -> ModelResult:
    """Quantize a chain of blocks of one architecture (``bcfg``, see :mod:`splitq_jax.block`):
    per block, the method's two steps (:meth:`~splitq_jax.methods.base.Method.calibrate_block`,
    then :meth:`~splitq_jax.methods.base.Method.fold_block`), then the streams move on.

    ``params_of[i]()`` returns block ``i``'s parameters (read lazily, one block at a time). Blocks
    are saved as ``block_XXX`` for the language model and ``vision_block_XXX`` for a vision tower.
    Arguments otherwise as :func:`quantize_decoder`.
    """
    method = method_of(cfg)
    spec = method.inference_spec(cfg)
    if stream.x.shape[-1] != bcfg.hidden:
        raise ValueError(f"stream width {stream.x.shape[-1]} != block width {bcfg.hidden}")
    work = Path(work_dir) if work_dir is not None else None
    if resume and (work is None or load_block is None):
        raise ValueError("resume needs a work directory and a block loader")
    prefix = "block" if part == "language" else f"{part}_block"
    # Vision blocks draw their keys from a separate stream so that adding --quantize-vision does
    # not change the language blocks' calibration.
    base_key = jax.random.PRNGKey(cfg.seed)
    if part != "language":
        base_key = jax.random.fold_in(base_key, 1 << 20)
    x_fp = stream.x
    if x_quant is not None and x_quant.shape != stream.x.shape:
        raise ValueError(f"x_quant {x_quant.shape} does not match the stream {stream.x.shape}")
    quantized_inputs = getattr(cfg, "block_inputs", "fp") == "quantized"
    x_q = (stream.x if x_quant is None else x_quant) if quantized_inputs else None
    folded_blocks: list[Tree] = []
    reports: list[BlockReport] = []
    for i, get_params in enumerate(params_of):
        t0 = time.time()
        params = get_params()
        mask = stream.mask_for(i)
        path = work / f"{prefix}_{i:03d}" if work is not None else None
        label = f"{'' if part == 'language' else part + ' '}block {i}"
        if resume and path is not None and path.exists():
            folded = load_block(path)
            y_fp = cal.fp_block_jit(bcfg)(params, x_fp, stream.cos, stream.sin, mask)
            report = _read_report(path, i)
        else:
            step_cb = (lambda t, loss, i=i: on_step(i, t, loss)) if on_step is not None else None
            try:
                data = cal.make_block_data(params, x_fp, stream.cos, stream.sin, mask, stream.modality, bcfg,
                                           x_quant=x_q)
                extra = {} if contexts is None else {"context": contexts[i]}
                result = method.calibrate_block(params, data, cfg, bcfg, key=jax.random.fold_in(base_key, i),
                                                on_step=step_cb, **extra)
            except NonFiniteError as e:
                raise NonFiniteError(f"{label}: {e}") from None
            # Every method's block goes through the one canonical fold and stores the one format.
            folded = canonicalize(method.fold_block(result, cfg, bcfg), bcfg.group_norm, spec.main_path)
            validate_folded_block(folded, spec, label)
            check_finite(folded, f"{label}: the folded (packed) block",
                         "the calibrated state was finite, so its folding overflowed; nothing was saved")
            y_fp = data.y
            report = BlockReport(
                i, result.init_loss, result.final_loss, time.time() - t0,
                channels={g: {"text": int(len(s.text_idx)), "vision": int(len(s.vision_idx))}
                          for g, s in result.stats.items()},
                part=part,
            )
            if path is not None and save_block is not None:
                _write_report(path, report)  # first: a block counts as done once its folded state exists
                save_block(path, folded)
        if x_q is not None:
            x_q = _folded_forward(spec, bcfg)(folded, x_q, stream.cos, stream.sin, mask, stream.modality)
            if not bool(jnp.all(jnp.isfinite(x_q))):
                raise NonFiniteError(f"the quantized {label} gives NaN or "
                                     "inf outputs (the quantized block inputs of the next block); try "
                                     "--block-inputs fp or a higher bit width")
        x_fp = y_fp
        folded_blocks.append(folded)
        reports.append(report)
        if on_block is not None:
            on_block(report)
        if fail_after_block is not None and i == fail_after_block:
            raise RuntimeError(f"injected failure after {'' if part == 'language' else part + ' '}block {i}")
    return ModelResult(folded_blocks, reports)


def _report_path(block_path) -> Path:
    return Path(str(block_path) + ".json")


def _write_report(block_path, report: BlockReport) -> None:
    write_json(_report_path(block_path), dataclasses.asdict(report), indent=None)


def _read_report(block_path, index: int) -> BlockReport:
    p = _report_path(block_path)
    if not p.exists():
        raise FileNotFoundError(f"block {index} is saved at {block_path} but its report {p} is missing; "
                                "rerun without --resume")
    r = BlockReport(**json.loads(p.read_text()))
    r.resumed = True
    return r


_FOLDED_CACHE: dict = {}


def _folded_forward(spec: InferenceSpec, bcfg):
    """``jit(folded_block_forward)`` per inference spec (the quantized-input stream)."""
    key = (spec, bcfg)
    if key not in _FOLDED_CACHE:
        _FOLDED_CACHE[key] = jax.jit(
            lambda f, x, c, s, m, mod: fold.folded_block_forward(f, x, c, s, m, mod, spec, bcfg))
    return _FOLDED_CACHE[key]
