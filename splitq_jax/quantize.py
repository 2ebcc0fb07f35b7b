"""The main job, as a library: model + calibration data + method -> exported low-bit checkpoint.

``scripts/calibrate.py`` is a thin wrapper around :func:`load_model_for_calibration`,
:func:`calibration_stream` and :func:`quantize_model`.

Work in progress is kept in ``<out>.work/`` (one folded block per finished block plus ``run.json``
with the options); ``--resume`` continues from there and refuses if the options differ. The final
checkpoint is written atomically by :func:`splitq_jax.quantized.export.save_quantized` and the work directory
is removed only after it is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from splitq_jax import calib_data as cd
from splitq_jax import fsutil
from splitq_jax import pipeline
from splitq_jax import sharding
from splitq_jax import preprocess as pp
from splitq_jax.config import MethodConfig, run_config
from splitq_jax.errors import SplitqError

EMBEDDED_DEFAULT = "qwen2.5-vl-mini"
# The embedded default sees small images (16-64 vision tokens) so that a run stays in minutes on CPU.
EMBEDDED_IMAGE_CFG = cd.qwen_image_budget(min_tokens=16, max_tokens=64)


class QuantizeError(SplitqError):
    """A problem with the run's inputs or output directory; the message says how to fix it."""


@dataclass
class ModelHandle:
    model: Any
    family: str
    name: str  # what the user asked for (embedded default, named config, path or hub id)
    tokenizer: Any
    image_cfg: Any
    pad_id: int
    source_dir: str | None  # HF directory the weights came from (None: embedded default)


def load_model_for_calibration(model_ref: str | None, *, seed: int = 0, dtype=jnp.float32) -> ModelHandle:
    """The embedded default (``None``), a named config, a local HF directory or a hub id."""
    if model_ref is None or model_ref == EMBEDDED_DEFAULT:
        from flax import nnx

        from splitq_jax.models.qwen2_5_vl import Qwen2_5_VL, get_config

        cfg = get_config(EMBEDDED_DEFAULT)
        model = Qwen2_5_VL(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
        return ModelHandle(model, "qwen2_5_vl", EMBEDDED_DEFAULT, pp.qwen_tokenizer(), EMBEDDED_IMAGE_CFG,
                           cfg.pad_token_id, None)
    import os

    from splitq_jax.models.converters.checkpoints import load_model, named_models

    ref = str(model_ref)
    if not os.path.exists(os.path.expanduser(ref)) and ref not in named_models() and "/" not in ref:
        raise QuantizeError(
            f"unknown model {ref!r}: give a named model ({', '.join(sorted(named_models()))}), a local "
            f"Hugging Face directory, or a hub id like Qwen/Qwen2.5-VL-3B-Instruct; omit --model for the "
            f"embedded default ({EMBEDDED_DEFAULT})")
    model, config, family, model_dir = load_model(model_ref, dtype=dtype)
    tokenizer = pp.load_tokenizer(model_dir)
    pad = config.pad_token_id if config.pad_token_id is not None else (tokenizer.pad_token_id or 0)
    return ModelHandle(model, family, str(model_ref), tokenizer, None, int(pad), str(model_dir))


def calibration_batches(handle: ModelHandle, *, source: str = cd.DEFAULT_SOURCE, samples: int = 128, seed: int = 0,
                        batch_size: int = 8, max_tokens: int | None = None,
                        raw: list[cd.Sample] | None = None) -> list[dict]:
    """Calibration samples (bundled default or JSONL; or ``raw`` if already loaded) through the
    model's processor: padded token batches with their pixels. A text-only model (the GGUF
    ``qwen2.5-coder-0.5b``) calibrates on windows of real Python code (``source`` ``"default"`` or
    ``"stdlib"``; ``max_tokens`` is the window length, default 512). For image samples,
    ``max_tokens`` cuts longer samples; without it a sample over ``calib_data.DEFAULT_MAX_TOKENS``
    tokens is refused, naming its file and line."""
    if is_text_only(handle.model):
        if str(source) not in (cd.DEFAULT_SOURCE, cd.CODE_SOURCE) or raw is not None:
            raise QuantizeError(f"{handle.name} is a text-only model: it calibrates on text, --calib-data "
                                f"{cd.CODE_SOURCE} (the default for it), not on image samples ({source})")
        encoded = cd.code_samples(handle.tokenizer, split="calib", n=samples, seed=seed,
                                  max_tokens=max_tokens or cd.DEFAULT_CODE_TOKENS)
        return cd.make_batches(encoded, batch_size, handle.pad_id)
    if str(source) == cd.CODE_SOURCE:
        raise QuantizeError(f"--calib-data {cd.CODE_SOURCE} (Python code) is for text-only models; {handle.name} "
                            "is a vision-language model: use the default data or a JSONL file with images")
    if raw is None:
        raw = cd.load_samples(source, n=samples, split="calib", seed=seed)
    encoded = cd.encode_samples(raw, handle.family, handle.tokenizer, handle.image_cfg, model_config=handle.model.config)
    if max_tokens is None:
        cd.check_lengths(encoded)
    return cd.make_batches(encoded, batch_size, handle.pad_id, max_tokens=max_tokens)


def is_text_only(model) -> bool:
    """A language model without a vision tower (``config.vision is None``)."""
    return getattr(model.config, "vision", True) is None


def calibration_stream(handle: ModelHandle, *, source: str = cd.DEFAULT_SOURCE, samples: int = 128, seed: int = 0,
                       batch_size: int = 8, max_tokens: int | None = None,
                       raw: list[cd.Sample] | None = None) -> pipeline.Stream:
    """:func:`calibration_batches` through the model's embedding: the first decoder block's inputs."""
    batches = calibration_batches(handle, source=source, samples=samples, seed=seed, batch_size=batch_size,
                                  max_tokens=max_tokens, raw=raw)
    return pipeline.embed_batches(handle.model, batches, handle.family)


@dataclass
class VisionJob:
    """What ``--quantize-vision`` adds to a run: the tower's calibration stream (one image per
    sample, :func:`splitq_jax.calib.vision.vision_stream`) and the method for its blocks."""

    stream: pipeline.Stream
    cfg: MethodConfig
    batches: list[dict] | None = None  # the calibration batches (re-embedded for quantized block inputs)


def vision_job(handle: ModelHandle, batches: list[dict], cfg: MethodConfig, bits: str | None = None) -> VisionJob:
    """The vision-tower part of a run, calibrated on the images of ``batches`` at ``bits``
    (default: the language model's)."""
    from splitq_jax import vision_block as vb
    from splitq_jax.calib import vision as cv

    try:
        vb.num_quantized_blocks(handle.model.config, handle.family)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    try:
        stream = cv.vision_stream(handle.model, handle.family, batches)
    except ValueError as e:
        raise QuantizeError(f"{e}; give a --calib-data file whose samples have images") from None
    return VisionJob(stream, cv.vision_method_config(cfg, bits), list(batches))


def preflight_config(model_ref: str | None, cfg: MethodConfig) -> None:
    """Checks that need only the model's configuration, for the embedded default and the named
    configs (whose decoder shapes are known without loading a weight): the weight group size."""
    from splitq_jax import preflight as pf
    from splitq_jax.models import llava, qwen2_5_vl

    name = model_ref or EMBEDDED_DEFAULT
    for family in (qwen2_5_vl, llava):
        if name in family.CONFIGS:
            pf.check_group_size_widths(pf.decoder_widths(family.CONFIGS[name].text), run_config(cfg))


def preflight_model(handle: ModelHandle, cfg: MethodConfig, out_dir: str | Path,
                    vision_cfg: MethodConfig | None = None) -> dict[str, int]:
    """Checks that need the model but no data, made before anything is written: the weight group
    size divides every width it applies to, and the output's file system has room for the
    finished blocks and the checkpoint (:mod:`splitq_jax.preflight`). Returns the estimates,
    ``{"checkpoint_bytes", "disk_bytes"}`` (the checkpoint; it plus the finished blocks kept
    beside it until it is complete)."""
    from flax import nnx

    from splitq_jax import preflight as pf

    model = handle.model
    blocks = list(model.blocks)
    params = blocks[0].block_params()
    groups = pipeline.block_config_of(model.config.text).groups
    pf.check_group_size(params, groups, cfg, "language")
    total = pf.nbytes(jax.tree_util.tree_leaves(nnx.state(model)))
    dropped = pf.nbytes(jax.tree_util.tree_leaves(params)) * len(blocks)
    stored = pf.block_weight_bytes(params, groups, cfg.w_bits) * len(blocks)
    if vision_cfg is not None:
        from splitq_jax import vision_block as vb

        try:
            vblocks = vb.quantized_blocks(model, handle.family)
        except ValueError as e:
            raise QuantizeError(str(e)) from None
        vparams = vb.block_params(vblocks[0], handle.family)
        vgroups = vb.block_config(model, handle.family).groups
        pf.check_group_size(vparams, vgroups, vision_cfg, "vision")
        dropped += pf.nbytes(jax.tree_util.tree_leaves(vparams)) * len(vblocks)
        stored += pf.block_weight_bytes(vparams, vgroups, vision_cfg.w_bits) * len(vblocks)
    # Finished blocks stay in <out>.work until the checkpoint (which holds them again) is complete.
    pf.check_disk(out_dir, total - dropped + 2 * stored)
    return {"checkpoint_bytes": total - dropped + stored, "disk_bytes": total - dropped + 2 * stored}


def check_batches_fit(handle: ModelHandle, batches: list[dict], cfg: MethodConfig) -> int:
    """Refuse calibration batches whose estimated peak memory exceeds what this process may still
    allocate (``preflight.run_memory``), before they are embedded; returns the estimate in bytes."""
    from splitq_jax import preflight as pf

    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = max(int(b["input_ids"].shape[1]) for b in batches)
    t = handle.model.config.text
    bcfg = pipeline.block_config_of(t)
    need = pf.run_memory(samples=samples, tokens=tokens, hidden=bcfg.hidden, intermediate=bcfg.intermediate,
                         num_heads=bcfg.num_heads, head_dim=bcfg.head_dim, batch_size=cfg.batch_size,
                         quantized_inputs=cfg.block_inputs == "quantized")
    pf.check_memory(need, f"calibrating {samples} samples of up to {tokens} tokens",
                    "lower --max-tokens (cuts samples), --samples or --batch-size")
    return need


def _run_record(handle: ModelHandle, cfg: MethodConfig, data: dict[str, Any],
                vision: VisionJob | None = None) -> dict[str, Any]:
    record = {"model": handle.name, "family": handle.family, "method": cfg.to_dict(), "data": data}
    if vision is not None:
        record["vision"] = {"method": vision.cfg.to_dict(), "images": int(vision.stream.x.shape[0])}
    return record


def prepare_output(out_dir: str | Path, *, overwrite: bool, resume: bool, record: dict[str, Any]) -> Path:
    """Check the output directory and set up ``<out>.work``; returns the work directory."""
    out = Path(out_dir)
    work = out.with_name(out.name + ".work")
    if out.exists() and not overwrite:
        raise QuantizeError(f"output directory {out} already exists; pass --overwrite to replace it "
                            "or choose another --out")
    if resume:
        run_file = work / "run.json"
        if not run_file.exists():
            raise QuantizeError(f"nothing to resume: {work} has no run.json; run without --resume")
        previous = json.loads(run_file.read_text())
        if previous != json.loads(json.dumps(record)):
            raise QuantizeError(f"--resume with different options than the interrupted run ({run_file}); "
                                "rerun with the same options, or without --resume to start over")
        return work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    fsutil.write_json(work / "run.json", json.loads(json.dumps(record, sort_keys=True)), indent=2)
    return work


def quantize_model(
    handle: ModelHandle,
    stream: pipeline.Stream,
    cfg: MethodConfig,
    out_dir: str | Path,
    *,
    data_record: dict[str, Any],
    overwrite: bool = False,
    resume: bool = False,
    fail_after_block: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    on_block: Callable[[pipeline.BlockReport], None] | None = None,
    vision: VisionJob | None = None,
    on_vision_step: Callable[[int, int, float], None] | None = None,
    on_model_pass: Callable[[int, int], None] | None = None,
    devices: Any = None,
) -> tuple[Path, pipeline.ModelResult]:
    """Calibrate every block (the vision tower's first when ``vision`` is given), then export the
    packed checkpoint to ``out_dir`` (atomically). ``on_block`` sees both parts (``report.part``);
    ``on_model_pass(done, total)`` follows a method's whole-model pass (MBQ's gradients), which
    runs before the language blocks and is saved for ``resume``. ``devices``: a device count, a
    :func:`splitq_jax.sharding.data_mesh`, or ``None`` for every device: each block's calibration
    batches are split over them (:mod:`splitq_jax.sharding`)."""
    from splitq_jax.errors import SplitqError
    from splitq_jax.preflight import nearest_existing

    mesh = sharding.data_mesh(devices)  # an impossible device count fails before anything is written
    cfg = run_config(cfg)
    record = _run_record(handle, cfg, data_record, vision)
    existing = nearest_existing(Path(out_dir).parent)
    work = prepare_output(out_dir, overwrite=overwrite, resume=resume, record=record)
    try:
        with sharding.data_parallel(mesh):
            return _quantize_and_export(handle, stream, cfg, out_dir, work, data_record=data_record,
                                         overwrite=overwrite, resume=resume, fail_after_block=fail_after_block,
                                         on_step=on_step, on_block=on_block, vision=vision,
                                         on_vision_step=on_vision_step, on_model_pass=on_model_pass)
    except SplitqError:
        # A refusal (diverged training, non-finite data, ...) leaves nothing behind: a rerun must
        # change its options, so a resume point would be refused anyway. A resumed run keeps its
        # work directory as it found it plus the blocks it finished. Crashes (other exceptions)
        # keep the work directory for --resume.
        if not resume:
            shutil.rmtree(work, ignore_errors=True)
            _remove_empty_parents(work.parent, existing)
        raise


def _remove_empty_parents(path: Path, stop: Path) -> None:
    """Remove ``path`` and its ancestors below ``stop`` while they are empty (directories the run created)."""
    path, stop = Path(os.path.abspath(path)), Path(os.path.abspath(stop))
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def _quantize_and_export(handle: ModelHandle, stream: pipeline.Stream, cfg: MethodConfig, out_dir: str | Path,
                          work: Path, *, data_record: dict[str, Any], overwrite: bool, resume: bool,
                          fail_after_block: int | None, on_step, on_block, vision: VisionJob | None,
                          on_vision_step, on_model_pass=None) -> tuple[Path, pipeline.ModelResult]:
    from splitq_jax.quantized import export

    vision_result = None
    if vision is not None:
        from splitq_jax import vision_block as vb

        fam = handle.family
        blocks = vb.quantized_blocks(handle.model, fam)
        vision_result = pipeline.quantize_blocks(
            [lambda b=b: vb.block_params(b, fam) for b in blocks], vb.block_config(handle.model, fam), vision.stream,
            vision.cfg, part="vision", work_dir=work, save_block=export.save_block, load_block=export.load_block,
            resume=resume, on_step=on_vision_step, on_block=on_block)
    x_quant = None
    if vision_result is not None and cfg.block_inputs == "quantized":
        # The quantized language blocks read what the quantized tower produces.
        from functools import partial

        from splitq_jax.runtime import quantized_vision_features

        if vision.batches is None:
            raise QuantizeError("block_inputs='quantized' with a quantized vision tower needs the VisionJob's batches")
        from splitq_jax.quantized.schema import InferenceSpec

        encoder = partial(quantized_vision_features, handle.model, handle.family, vision_result.folded_blocks,
                          InferenceSpec.of(vision.cfg))
        x_quant = pipeline.embed_batches(handle.model, vision.batches, handle.family, vision_encoder=encoder).x
    result = pipeline.quantize_decoder(
        handle.model, stream, cfg, work_dir=work, save_block=export.save_block, load_block=export.load_block,
        resume=resume, fail_after_block=fail_after_block, on_step=on_step, on_block=on_block, x_quant=x_quant,
        on_model_pass=on_model_pass,
    )
    def reports(rs):
        return [{"index": r.index, "init_loss": r.init_loss, "final_loss": r.final_loss, "seconds": r.seconds,
                 "resumed": r.resumed, "channels": r.channels} for r in rs]

    manifest_extra = {"source_dir": handle.source_dir, "data": data_record, "blocks": reports(result.reports),
                      "devices": sharding.device_count()}
    if vision_result is not None:
        manifest_extra["vision_block_reports"] = reports(vision_result.reports)
    if result.model_pass is not None:
        manifest_extra["model_pass"] = result.model_pass
    path = export.save_quantized(out_dir, family=handle.family, model_config=handle.model.config,
                                 fp_params=handle.model, folded_blocks=result.folded_blocks, method_config=cfg,
                                 manifest_extra=manifest_extra, model_name=handle.name, overwrite=overwrite,
                                 vision_blocks=None if vision_result is None else vision_result.folded_blocks,
                                 vision_method_config=None if vision is None else vision.cfg)
    shutil.rmtree(work, ignore_errors=True)
    return Path(path), result
