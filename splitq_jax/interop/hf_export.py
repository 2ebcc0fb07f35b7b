"""A quantized checkpoint as an HF model directory in the compressed-tensors format.

``export_hf(ckpt, out)`` writes what ``transformers`` (with the ``compressed-tensors`` package)
and vLLM load with ``from_pretrained``::

    out/
      config.json              the source model's HF config + quantization_config
      model.safetensors        (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
                               every decoder linear as weight_packed / weight_scale / weight_shape
                               (/ weight_zero_point), everything else under its HF name
      tokenizer*.json, ...     the tokenizer and processor files of the source model
      splitq_export.json       provenance: the checkpoint, its method and settings, this export

Only checkpoints whose folded form *is* the format can be exported: integer decoder weights with
per-channel or per-group scales, plain norms, and (with activation quantization) the plain
per-token quantizer of every linear's input. That is RTN, SmoothQuant (its smoothing factors are
folded into the norms and the weights), GPTQ, GPTAQ and VLM-PTQ. What the format cannot hold is
refused with the reason (:class:`ExportError`): an online input transform (FlatQuant's Kronecker
product), a learned activation clip, MOCD's channel split, low-rank branches, a quantized vision
tower, 2- or 3-bit activations. Nothing is written then.

The directory is built beside ``out`` and renamed into place at the end (:func:`splitq_jax.fsutil.atomic_dir`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax.fsutil import atomic_dir, write_json
from splitq_jax.interop import compressed_tensors as ct
from splitq_jax.interop.compressed_tensors import ExportError
from splitq_jax.models.family import family_of
from splitq_jax.packing import PackedTensor
from splitq_jax.quantized import export

PROVENANCE_FILE = "splitq_export.json"
SHARD_BYTES = 4 * 2**30  # one safetensors file up to this size; more get an index
# Tokenizer and processor files an HF model directory carries (whichever the source has).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "added_tokens.json", "tokenizer.model", "chat_template.json", "chat_template.jinja",
              "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
              "generation_config.json")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------------------ what can go


def _refuse(method: str, where: str, what: str) -> ExportError:
    return ExportError(f"a {method} checkpoint cannot be exported to compressed-tensors: {where} has {what}, "
                       f"which the format cannot hold. Export a checkpoint of rtn, smoothquant, gptq, gptaq or "
                       f"vlm-ptq, or run it with splitq_jax's own runtime")


def plain_linears(block: Mapping[str, Any], method: str, where: str
                  ) -> Iterator[tuple[str, PackedTensor, Any]]:
    """``(name, weight, bias or None)`` of every linear of a folded block, after checking that
    the block is nothing but integer linears behind plain norms (else :class:`ExportError`)."""
    for norm, params in block["norms"].items():
        if "bias" in params:
            raise _refuse(method, f"{where} norm {norm}", "a bias on an RMSNorm")
    for g, group in block["groups"].items():
        acts, split = group["acts"], group["split"]
        found = []  # every reason, so that a SplitQ checkpoint is told all it carries
        if acts.get("transform") is not None:
            found.append("an online transform of the linear's input (FlatQuant's Kronecker product or a "
                         "per-channel scale applied at run time)")
        if acts.get("act_clip") is not None:
            found.append("a learned clipping ratio of the activation quantizer (the format's dynamic quantizer "
                         "takes the plain per-token maximum)")
        if any(acts.get(k) is not None for k in ("text", "vision")) or split["main_mask"] is not None \
                or any(np.size(split[k]) for k in ("text_idx", "vision_idx")):
            found.append("MOCD's split of the input channels into a main group and text/vision outlier groups")
        extra = sorted({p for parts in group["weights"].values() for p in parts} - {"main"})
        if extra:
            found.append(f"weight parts {extra} beside the main weight (low-rank CWS/MAC branches, outlier weights)")
        if any(not isinstance(parts["main"], PackedTensor) for parts in group["weights"].values()):
            found.append("a floating-point weight")
        if found:
            raise _refuse(method, f"{where} group {g}", "; ".join(found))
        for name, parts in group["weights"].items():
            yield name, parts["main"], group["biases"].get(name)


def _weight_format(linears: list[PackedTensor]) -> tuple[int, bool, int | None]:
    formats = {(w.bits, w.symmetric, w.group_size) for w in linears}
    if len(formats) != 1:
        raise ExportError(f"the decoder's linears are stored in {len(formats)} different formats "
                          f"(bits, symmetric, group size) {sorted(formats, key=str)}; the export writes one "
                          f"config group")
    return formats.pop()


# -------------------------------------------------------------------------------- HF config


def _converter(family: str):
    fam = family_of(family)
    return importlib.import_module(fam.converter.partition(":")[0])


def _qwen_config(cfg) -> dict[str, Any]:
    """An HF config for a Qwen model that came without one (the embedded default)."""
    t = cfg.text
    text = {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps, "hidden_act": t.hidden_act,
            "max_position_embeddings": 32768, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": list(cfg.eos_token_id) or None, "pad_token_id": cfg.pad_token_id,
            "tie_word_embeddings": t.tie_word_embeddings}
    specials = {"image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
                "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id}
    if cfg.vision is None:  # the special ids are ours to keep; Qwen2's config carries unknown keys along
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": t.rope_theta, **text,
                **specials}
    v = cfg.vision
    text.update(model_type="qwen2_5_vl_text", rope_parameters={
        "rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(cfg.mrope_section)})
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "text_config": text, "tie_word_embeddings": t.tie_word_embeddings,
            "vision_config": {"depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                              "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size,
                              "in_channels": v.in_channels, "patch_size": v.patch_size,
                              "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
                              "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                              "tokens_per_second": v.tokens_per_second, "hidden_act": v.hidden_act},
            **specials}


def hf_config(family: str, model_config, source_dir: str | None) -> dict[str, Any]:
    """The HF ``config.json`` of the exported model: the source's, when the checkpoint's source
    directory still has it and it describes the same model; otherwise rebuilt (Qwen family)."""
    conv = _converter(family)

    def same(d: dict) -> bool:
        try:
            ours = conv.config_from_hf(d)
        except Exception:
            return False
        return dataclasses.replace(ours, hf_id=None) == dataclasses.replace(model_config, hf_id=None)

    path = Path(source_dir) / "config.json" if source_dir else None
    if path is not None and path.is_file():
        d = json.loads(path.read_text())
        if same(d):
            d.pop("quantization_config", None)
            return d
    if family == "qwen2_5_vl":
        d = _qwen_config(model_config)
        if not same(d):  # a field this rebuild does not know; better no export than a wrong model
            raise ExportError("cannot rebuild an HF config.json that describes this model; keep the source model "
                              f"directory ({source_dir}) with its config.json and export again")
        return d
    raise ExportError(f"the checkpoint's source model directory {source_dir!r} with its config.json is not "
                      f"available here (a {family} config is not rebuilt); export where it is")


# ---------------------------------------------------------------------------------- tensors


def _flat(tree: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], Any]]:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), leaf


def _block_tensors(block: Mapping[str, Any], i: int, key_for, method: str, dtype) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    layer = ("language_model", "layers", str(i))
    for norm, params in block["norms"].items():
        out[key_for(layer + (norm, "scale"))[0]] = np.asarray(params["scale"], dtype)
    for name, w, bias in plain_linears(block, method, f"block {i}"):
        mod = layer + ("self_attn" if name in _ATTN else "mlp", name)
        key = key_for(mod + ("w",))[0]
        prefix = key.removesuffix(".weight")
        for suffix, arr in ct.linear_tensors(w).items():
            out[f"{prefix}.{suffix}"] = arr.astype(dtype) if suffix == "weight_scale" else arr
        if bias is not None:
            out[key_for(mod + ("b",))[0]] = np.asarray(bias, dtype)
    return out


def _write_safetensors(root: Path, tensors: dict[str, np.ndarray]) -> list[str]:
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(tensors):
        if size and size + tensors[k].nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = np.ascontiguousarray(tensors[k])
        size += tensors[k].nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors" for j in range(len(shards))]
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        write_json(root / "model.safetensors.index.json", index, indent=2)
    for n, s in zip(names, shards):
        save_file(s, str(root / n), metadata={"format": "pt"})  # transformers reads only "pt"-tagged files
    return names


def _side_files(source_dir: str | None, model_name: str | None, dst: Path) -> list[str]:
    """Copy the tokenizer/processor files of the source model; the embedded default's tokenizer is
    the real Qwen2.5 one and is saved from there."""
    copied = []
    if source_dir and Path(source_dir).is_dir():
        for name in SIDE_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copyfile(src, dst / name)
                copied.append(name)
    if not copied and model_name == "qwen2.5-vl-mini":
        from splitq_jax import preprocess as pp

        before = set(os.listdir(dst))
        pp.qwen_tokenizer().save_pretrained(str(dst))
        copied = sorted(set(os.listdir(dst)) - before)
    return copied


# ------------------------------------------------------------------------------ pre-flight

# Methods whose folded checkpoint is plain integer linears behind plain norms (the structural
# check of plain_linears is what decides; this list lets a run refuse before calibrating).
EXPORTABLE_METHODS = ("rtn", "smoothquant", "gptq", "gptaq", "vlm-ptq", "awq", "mbq", "tlq")
NO_HF_ARCHITECTURE = ("easyvqa-vlm-0.5b",)  # LLaVA with a pooled DINOv2 tower


def check_request(cfg: Any, *, model_name: str | None, quantize_vision: bool, out_dir: str | os.PathLike,
                  overwrite: bool) -> None:
    """Refuse, before any calibration, a run whose ``--export-hf`` cannot succeed (same reasons as
    :func:`export_hf`, from the method config alone)."""
    method = getattr(cfg, "method", None)
    if method not in EXPORTABLE_METHODS:
        raise ExportError(f"--export-hf: a {method} checkpoint cannot be written in the compressed-tensors format "
                          f"(it has no place for {method}'s online transforms, channel split or branches); "
                          f"the exportable methods are {', '.join(EXPORTABLE_METHODS)}")
    ct.check_settings(w_bits=cfg.w_bits, a_bits=cfg.a_bits, a_symmetric=getattr(cfg, "a_symmetric", True),
                      group_size=getattr(cfg, "w_group_size", None))
    if quantize_vision:
        raise ExportError("--export-hf keeps the vision tower in floating point; drop --quantize-vision")
    if model_name in NO_HF_ARCHITECTURE:
        raise ExportError(f"--export-hf: {model_name} has no transformers architecture (a pooled DINOv2 tower); "
                          f"run it with splitq_jax's own runtime")
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")


# ----------------------------------------------------------------------------------- export


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
              verify: bool = True) -> dict[str, Any]:
    """Write the checkpoint ``ckpt_dir`` as a compressed-tensors HF model directory at ``out_dir``.

    Refuses (:class:`ExportError`, nothing written) a checkpoint the format cannot hold and an
    existing ``out_dir`` unless ``overwrite``. Floating-point tensors and scales keep the
    checkpoint's dtype. Returns the provenance record (also written to ``splitq_export.json``).
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    manifest, fp, blocks, vision = export.load_quantized_parts(ckpt_dir, verify=verify)
    family, method = manifest["model"]["family"], manifest["method"]
    model_config = export.model_config_from_dict(family, manifest["model"]["config"])
    fam = family_of(family, model_config)
    if fam.vision_tower == "dinov2":
        raise ExportError("LLaVA with a DINOv2 tower (easyvqa-vlm-0.5b) has no transformers architecture: "
                          "transformers' LLaVA takes a tower's hidden states as they are, this model pools them; "
                          "run it with splitq_jax's own runtime")
    if vision is not None:
        raise ExportError("the checkpoint has a quantized vision tower (--quantize-vision); the export keeps the "
                          "tower in floating point (vLLM and transformers run it so): calibrate without "
                          "--quantize-vision to export")
    spec = export._spec_of(manifest, Path(ckpt_dir))  # the manifest's inference spec, as loading reads it
    linears = [w for i, b in enumerate(blocks) for _, w, _ in plain_linears(b, method, f"block {i}")]
    w_bits, w_symmetric, group_size = _weight_format(linears)
    ct.check_settings(w_bits=w_bits, a_bits=spec.a_bits, a_symmetric=spec.a_symmetric, group_size=group_size)
    conv = _converter(family)
    config = hf_config(family, model_config, manifest.get("source_dir"))
    qconfig = ct.quantization_config(w_bits=w_bits, w_symmetric=w_symmetric, group_size=group_size,
                                     a_bits=spec.a_bits, ignore=conv.EXPORT_IGNORE)
    ct.validate(qconfig)
    dtype = np.dtype(jnp.dtype(manifest["model"]["dtype"]))  # jnp knows bfloat16 (ml_dtypes)
    config.update(quantization_config=qconfig, torch_dtype=manifest["model"]["dtype"],
                  dtype=manifest["model"]["dtype"])

    tensors: dict[str, np.ndarray] = {}
    for path, leaf in _flat(fp):
        key, transform = conv.key_for(path)
        tensors[key] = np.asarray(conv.unload_transform(transform, np.asarray(leaf), model_config), dtype)
    for i, block in enumerate(blocks):
        tensors.update(_block_tensors(block, i, conv.key_for, method, dtype))
    record = {"format": f"{ct.QUANT_METHOD}/{ct.FORMAT}", "checkpoint": str(Path(ckpt_dir).expanduser().absolute()),
              "checkpoint_created": manifest.get("created"), "model": manifest["model"]["name"], "family": family,
              "method": method, "bits": manifest["bits"], "method_config": manifest.get("method_config"),
              "weights": {"bits": w_bits, "symmetric": w_symmetric, "group_size": group_size},
              "input_activations": None if spec.a_bits is None else {
                  "bits": spec.a_bits, "note": "dynamic per token; the loader's scale is absmax/((qmax-qmin)/2), "
                                               "calibration used absmax/qmax"},
              "versions": export.package_versions()}
    with atomic_dir(out, replace=overwrite) as tmp:
        record["files"] = _write_safetensors(tmp, tensors)
        record["side_files"] = _side_files(manifest.get("source_dir"), manifest["model"]["name"], tmp)
        write_json(tmp / "config.json", config, indent=2)
        write_json(tmp / PROVENANCE_FILE, record, indent=2)
    return record


__all__ = ["EXPORTABLE_METHODS", "ExportError", "PROVENANCE_FILE", "check_request", "export_hf", "hf_config",
           "plain_linears"]
