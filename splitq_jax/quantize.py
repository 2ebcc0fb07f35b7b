"""The main job, as a library: model + calibration data + method -> exported low-bit checkpoint.

``scripts/calibrate.py`` is a thin wrapper around :func:`load_model_for_calibration`,
:func:`calibration_stream` and :func:`quantize_model`.

Work in progress is kept in ``<out>.work/`` (one folded block per finished block plus ``run.json``
with the options); ``--resume`` continues from there and refuses if the options differ. The final
checkpoint is written atomically by :func:`splitq_jax.export.save_quantized` and the work directory
is removed only after it is complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp

from splitq_jax import calib_data as cd
from splitq_jax import pipeline
from splitq_jax import preprocess as pp
from splitq_jax.config import MethodConfig

EMBEDDED_DEFAULT = "qwen2.5-vl-mini"
# The embedded default sees small images (16-64 vision tokens) so that a run stays in minutes on CPU.
EMBEDDED_IMAGE_CFG = cd.qwen_image_budget(min_tokens=16, max_tokens=64)


class QuantizeError(ValueError):
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

    from converters.checkpoints import load_model, named_models

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


def calibration_stream(handle: ModelHandle, *, source: str = cd.DEFAULT_SOURCE, samples: int = 128, seed: int = 0,
                       batch_size: int = 8, max_tokens: int | None = None,
                       raw: list[cd.Sample] | None = None) -> pipeline.Stream:
    """Calibration samples (bundled default or JSONL; or ``raw`` if already loaded) through the model's
    processor and embedding."""
    if raw is None:
        raw = cd.load_samples(source, n=samples, split="calib", seed=seed)
    encoded = cd.encode_samples(raw, handle.family, handle.tokenizer, handle.image_cfg)
    batches = cd.make_batches(encoded, batch_size, handle.pad_id, max_tokens=max_tokens)
    return pipeline.embed_batches(handle.model, batches, handle.family)


def _run_record(handle: ModelHandle, cfg: MethodConfig, data: dict[str, Any]) -> dict[str, Any]:
    return {"model": handle.name, "family": handle.family, "method": cfg.to_dict(), "data": data}


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
    tmp = work / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(work / "run.json")
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
) -> tuple[Path, pipeline.ModelResult]:
    """Calibrate every block, then export the packed checkpoint to ``out_dir`` (atomically)."""
    from splitq_jax import export

    record = _run_record(handle, cfg, data_record)
    work = prepare_output(out_dir, overwrite=overwrite, resume=resume, record=record)
    result = pipeline.calibrate_model(
        handle.model, stream, cfg, work_dir=work, save_block=export.save_block, load_block=export.load_block,
        resume=resume, fail_after_block=fail_after_block, on_step=on_step, on_block=on_block,
    )
    manifest_extra = {
        "source_dir": handle.source_dir,
        "data": data_record,
        "blocks": [
            {"index": r.index, "init_loss": r.init_loss, "final_loss": r.final_loss, "seconds": r.seconds,
             "resumed": r.resumed, "channels": r.channels}
            for r in result.reports
        ],
    }
    path = export.save_quantized(out_dir, family=handle.family, model_config=handle.model.config,
                                 fp_params=handle.model, folded_blocks=result.folded_blocks, method_config=cfg,
                                 manifest_extra=manifest_extra, model_name=handle.name, overwrite=overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return Path(path), result
