"""Writing quantized models (and single folded blocks) to disk, and checking what was written.

Two artifacts, one encoding:

* :func:`save_block` / :func:`load_block`: one folded block (:mod:`splitq_jax.quantized.schema`), the pipeline's
  per-block resume point.
* :func:`save_quantized`: the deliverable, a directory that :func:`splitq_jax.runtime.load_quantized`
  turns back into a model::

      out_dir/
        state/            one orbax checkpoint (StandardCheckpointer) of the tree
                            {"fp":     the model's unquantized parameters (embeddings, vision tower,
                                        final norm, head; NNX names, e.g. fp.language_model.norm.scale),
                             "blocks": {"0": folded block 0, ...},
                             "vision_blocks": {"0": ...}}   only with a quantized vision tower, whose
                                        blocks are then left out of "fp"
                          packed weights are leaves named like
                            blocks.3.groups.attn_in.weights.q_proj.main.{qvalue,scale,zero_point}
        structure.json    what orbax cannot hold: the tree layout, PackedTensor metadata (bits,
                          shape, symmetric, group_size, word_dtype), None leaves, empty arrays
        manifest.json     model (name, family, config), method, bits, every option of the method config,
                          manifest_extra (e.g. per-block losses), package versions, sha256 and size
                          of every other file; written last

  A block directory is the same without ``fp`` and with ``block.json`` (structure + checksums +
  caller metadata) in place of the last two files.

Atomicity: everything is written into ``<out>.tmp-<pid>`` beside the target, fsynced, and renamed
onto ``<out>`` at the end; the manifest is the last file written, so a directory without one is
never a complete checkpoint. A failed save removes its temporary directory and leaves an existing
``<out>`` untouched. Replacing (``overwrite=True``) moves the old directory aside, renames the new
one in, then deletes the old one.

The tree encoding is :mod:`splitq_jax.quantized.codec`'s: loading rebuilds the exact pytree (same
treedef including PackedTensor metadata, same dtypes, bit-identical values).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax.finite import check_finite
from splitq_jax.fsutil import OCDBT_FILE_BYTES, sha256_file  # noqa: F401  (sha256_file: re-exported)
from splitq_jax.models.family import CHECKPOINT_FAMILIES, Family, UnknownFamilyError, family_of, get_family
from splitq_jax.packing import PackedTensor
from splitq_jax.quantized.codec import decode_tree, encode_tree  # noqa: F401  (re-exported)
from splitq_jax.quantized.codec import restore_arrays, save_arrays
from splitq_jax.quantized.schema import CheckpointError, InferenceSpec, validate_folded_block

Tree = Any

FORMAT = "splitq-quantized"
BLOCK_FORMAT = "splitq-block"
FORMAT_VERSION = 1
STATE_DIR = "state"
STRUCTURE_FILE = "structure.json"
MANIFEST_FILE = "manifest.json"
BLOCK_FILE = "block.json"
_PACKAGES = ("splitq-jax", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "ml_dtypes")
_RESERVED = frozenset({"format", "format_version", "created", "model", "method", "bits", "method_config", "inference",
                       "storage", "versions", "files", "vision"})


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, jax.Array)):
        return np.asarray(o).tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _finite(o: Any) -> Any:
    """Non-finite floats become null (strict JSON has no NaN; a resumed block has no loss)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Mapping):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _write_json(path: Path, obj: Any) -> None:
    # Round-trip through the default hook first so that _finite sees plain Python values.
    plain = json.loads(json.dumps(obj, default=_json_default))
    path.write_text(json.dumps(_finite(plain), indent=2, allow_nan=False) + "\n")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupted") from e


def _checksums(root: Path, exclude: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def _verify_files(root: Path, files: Mapping[str, Mapping[str, Any]]) -> None:
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            raise CheckpointError(f"{root}: file {rel} is missing (the checkpoint is incomplete or was modified)")
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{root}: file {rel} is corrupted (sha256 mismatch); re-export the checkpoint")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _temp_dir(out: Path) -> Path:
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by an earlier crashed run of a process with our pid
        _remove_tree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """fsync ``tmp`` and rename it onto ``out``."""
    _fsync_tree(tmp)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        _remove_tree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        _remove_tree(old)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


def _prepare(out_dir: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, _temp_dir(out)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------
# One folded block (per-block resume)
# --------------------------------------------------------------------------------------------


def save_block(path: str | os.PathLike, folded: Tree, *, meta: Mapping[str, Any] | None = None,
               overwrite: bool = True) -> Path:
    """Write one folded block to the directory ``path`` atomically; returns it.

    ``meta`` (JSON-able: e.g. the block's losses, the method config dict) is stored beside it and
    read back by :func:`load_block_meta`. An existing ``path`` is replaced (a re-run recalibrates);
    ``overwrite=False`` refuses instead.
    """
    check_finite(folded, f"the folded block for {path}", "nothing was written")
    out, tmp = _prepare(path, overwrite)
    try:
        structure, arrays = encode_tree(folded)
        save_arrays(tmp / STATE_DIR, arrays)
        _write_json(tmp / BLOCK_FILE, {"format": BLOCK_FORMAT, "format_version": FORMAT_VERSION,
                                       "structure": structure, "meta": dict(meta or {}),
                                       "files": _checksums(tmp)})
        _commit(tmp, out, overwrite)
    except BaseException:
        _remove_tree(tmp)
        raise
    return out


def _block_header(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a saved block (no such directory)")
    header = _read_json(path / BLOCK_FILE, "not a block written by save_block (or an interrupted one)")
    _check_format(header, BLOCK_FORMAT, path)
    return header


def load_block(path: str | os.PathLike, *, verify: bool = True) -> Tree:
    """The folded block saved by :func:`save_block`: same pytree, bit-identical arrays.

    ``verify`` checks the sha256 of every file first (CheckpointError naming a corrupted one).
    """
    path = Path(path).expanduser().absolute()
    header = _block_header(path)
    if verify:
        _verify_files(path, header["files"])
    return decode_tree(header["structure"], restore_arrays(path / STATE_DIR, header["structure"]))


def load_block_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` given to :func:`save_block` (no arrays are read)."""
    return _block_header(Path(path).expanduser().absolute())["meta"]


# --------------------------------------------------------------------------------------------
# The whole quantized model
# --------------------------------------------------------------------------------------------


def _check_format(header: Mapping[str, Any], fmt: str, where: Path) -> None:
    if header.get("format") != fmt:
        raise CheckpointError(f"{where} holds format {header.get('format')!r}, expected {fmt!r}")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format version {version!r}; this splitq_jax reads version "
                              f"{FORMAT_VERSION} only (re-export it with a matching splitq_jax)")


def fp_state_dict(fp_params: Any) -> dict:
    """The unquantized parameters as a pure nested dict, decoder layers removed.

    Accepts the full-precision NNX model, its ``nnx.State`` or a pure dict (``nnx.to_pure_dict``).
    """
    from flax import nnx

    if isinstance(fp_params, nnx.Module):
        fp_params = nnx.state(fp_params)
    if isinstance(fp_params, nnx.State):
        fp_params = nnx.to_pure_dict(fp_params)
    if not isinstance(fp_params, Mapping):
        raise TypeError(f"fp_params must be an NNX model, its state or a pure dict, got {type(fp_params).__name__}")
    out = {k: v for k, v in fp_params.items()}
    if "language_model" in out:
        out["language_model"] = {k: v for k, v in out["language_model"].items() if k != "layers"}
    return out


def model_config_from_dict(family: str, d: Mapping[str, Any]):
    """Rebuild a model config dataclass from ``dataclasses.asdict`` output (JSON lists -> tuples)."""
    from splitq_jax.models.layers import DecoderConfig

    def tuples(v: Any) -> Any:
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    try:
        fam = family_of(family, SimpleNamespace(vision_tower=d.get("vision_tower")))
    except UnknownFamilyError as e:
        raise CheckpointError(str(e)) from None
    top = {k: tuples(v) for k, v in d.items() if k not in ("text", "vision")}
    text = DecoderConfig(**{k: tuples(v) for k, v in d["text"].items()})
    vcls = Family.resolve(fam.vision_config_class)
    vision = None if d.get("vision") is None else vcls(**{k: tuples(v) for k, v in d["vision"].items()})
    return Family.resolve(fam.config_class)(text=text, vision=vision, **top)


def without_layers(model_config):
    """``model_config`` with a decoder of 0 layers: the module that holds the fp parameters."""
    return dataclasses.replace(model_config, text=dataclasses.replace(model_config.text, num_layers=0))


def abstract_fp_model(family: str, model_config, dtype=jnp.float32):
    """The fp part (no decoder layers) of a model as an abstract NNX module."""
    return get_family(family).abstract_model(without_layers(model_config), dtype)


def strip_vision_layers(fp: dict, family: str) -> dict:
    """``fp`` without the vision tower's blocks (they are stored quantized instead)."""
    fam = get_family(family)  # where the family keeps its tower's blocks (left out of "fp" when quantized)
    top, key = fam.vision_attr, fam.vision_blocks_attr
    if top not in fp:
        raise ValueError(f"the {family} fp parameters have no {top!r}: there is no vision tower to quantize")
    return {**fp, top: {k: v for k, v in fp[top].items() if k != key}}


def drop_vision_layers(module, family: str):
    """An NNX model whose vision tower has no blocks (the runtime module of a checkpoint with a
    quantized tower: its blocks run from the folded trees)."""
    from flax import nnx

    fam = get_family(family)  # where the family keeps its tower's blocks (left out of "fp" when quantized)
    top, key = fam.vision_attr, fam.vision_blocks_attr
    setattr(getattr(module, top), key, nnx.List([]))
    return module


def _check_fp(fp: dict, family: str, model_config, vision_quantized: bool = False) -> str:
    """Shapes of ``fp`` against the model; returns the parameter dtype name."""
    from flax import nnx

    abstract = abstract_fp_model(family, model_config)
    if vision_quantized:
        abstract = drop_vision_layers(abstract, family)
    expected = nnx.to_pure_dict(nnx.state(abstract))
    exp_flat = {tuple(map(str, p)): v for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got_flat = {tuple(map(str, p)): v for p, v in jax.tree_util.tree_flatten_with_path(fp)[0]}
    missing, extra = sorted(set(exp_flat) - set(got_flat)), sorted(set(got_flat) - set(exp_flat))
    if missing or extra:
        raise ValueError(f"fp_params do not match the {family} config: missing {missing[:5]}, unexpected {extra[:5]}")
    for p, v in got_flat.items():
        if tuple(np.shape(v)) != tuple(exp_flat[p].shape):
            raise ValueError(f"fp parameter {''.join(p)} has shape {np.shape(v)}, the config needs {exp_flat[p].shape}")
    dtypes = {jnp.dtype(v.dtype).name for v in got_flat.values()}
    if len(dtypes) != 1:
        raise ValueError(f"fp parameters mix dtypes {sorted(dtypes)}; cast them to one dtype")
    return dtypes.pop()


def _storage(folded_blocks: Sequence[Tree], fp: dict) -> dict[str, int]:
    packed = weights = other = 0
    for blk in folded_blocks:
        for leaf in jax.tree_util.tree_leaves(blk, is_leaf=lambda x: isinstance(x, PackedTensor)):
            if isinstance(leaf, PackedTensor):
                packed += sum(int(a.size) * a.dtype.itemsize for a in (leaf.qvalue, leaf.scale, leaf.zero_point)
                              if a is not None)
                weights += int(np.prod(leaf.shape))
            else:
                other += int(leaf.size) * leaf.dtype.itemsize
    fp_bytes = sum(int(v.size) * v.dtype.itemsize for v in jax.tree_util.tree_leaves(fp))
    return {"packed_weight_bytes": packed, "packed_weight_values": weights, "block_other_bytes": other,
            "fp_bytes": fp_bytes}


def save_quantized(out_dir: str | os.PathLike, *, family: str, model_config, fp_params: Any,
                   folded_blocks: Sequence[Tree], method_config: Any,
                   manifest_extra: Mapping[str, Any] | None = None, model_name: str | None = None,
                   overwrite: bool = False, vision_blocks: Sequence[Tree] | None = None,
                   vision_method_config: Any = None) -> Path:
    """Write a quantized model to ``out_dir`` atomically (layout in the module docstring).

    Args:
      family: ``"qwen2_5_vl"`` or ``"llava"``.
      model_config: the model's config dataclass (``Qwen2_5_VLConfig`` / ``LlavaConfig``).
      fp_params: the full-precision model (NNX module), its state or pure dict; its decoder layers
        are dropped, everything else (embeddings, vision tower, projector, final norm, head) is saved.
      folded_blocks: one folded block (:mod:`splitq_jax.quantized.schema`) per decoder layer, in order.
      method_config: the method config the blocks were calibrated with (a method's config or an
        engine setting): its name, bits and options are provenance, its inference spec what loading reads.
      manifest_extra: JSON-able entries merged into the manifest's top level (e.g.
        ``{"block_losses": [...], "calibration": {...}}``); NaN/inf become null.
      model_name: recorded in the manifest; defaults to ``model_config.hf_id``.
      overwrite: replace an existing ``out_dir`` (otherwise FileExistsError).
      vision_blocks: folded vision-tower blocks (``--quantize-vision``), with the
        ``vision_method_config`` they were calibrated with; the tower's fp blocks are then not saved.
    Returns:
      the absolute path of the checkpoint.
    """
    if family not in CHECKPOINT_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(CHECKPOINT_FAMILIES)}")
    extra = dict(manifest_extra or {})
    clash = sorted(_RESERVED & set(extra))
    if clash:
        raise ValueError(f"manifest_extra may not set {clash}: the manifest writes those itself")
    n_layers = model_config.text.num_layers
    if len(folded_blocks) != n_layers:
        raise ValueError(f"{len(folded_blocks)} folded blocks for a decoder of {n_layers} layers")
    fp = fp_state_dict(fp_params)
    tree = {"fp": fp, "blocks": {str(i): b for i, b in enumerate(folded_blocks)}}
    vision = None
    if vision_blocks is not None:
        if vision_method_config is None:
            raise ValueError("vision_blocks need the vision_method_config they were calibrated with")
        fp = tree["fp"] = strip_vision_layers(fp, family)
        tree["vision_blocks"] = {str(i): b for i, b in enumerate(vision_blocks)}
        vision = {"num_blocks": len(vision_blocks), "method": vision_method_config.method,
                  "bits": vision_method_config.bits, "method_config": vision_method_config.to_dict(),
                  "inference": InferenceSpec.of(vision_method_config).to_dict()}
    dtype = _check_fp(fp, family, model_config, vision_quantized=vision is not None)
    _validate_blocks(folded_blocks, InferenceSpec.of(method_config), "block")
    if vision_blocks is not None:
        _validate_blocks(vision_blocks, InferenceSpec.of(vision_method_config), "vision block")
    # Never publish a NaN: a checkpoint that loads and then answers garbage is worse than none.
    check_finite(tree, f"the checkpoint for {out_dir}", "nothing was written")
    out, tmp = _prepare(out_dir, overwrite)
    try:
        structure, arrays = encode_tree(tree)
        save_arrays(tmp / STATE_DIR, arrays)
        _write_json(tmp / STRUCTURE_FILE, structure)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": model_name or getattr(model_config, "hf_id", None), "family": family,
                      "dtype": dtype, "num_layers": n_layers, "config": dataclasses.asdict(model_config)},
            "method": method_config.method,
            "bits": method_config.bits,
            "method_config": method_config.to_dict(),
            "inference": InferenceSpec.of(method_config).to_dict(),  # all that loading needs
            "storage": _storage(list(folded_blocks) + list(vision_blocks or []), fp),
            **({"vision": vision} if vision is not None else {}),
            **extra,
            "versions": package_versions(),
            "files": _checksums(tmp),
        }
        _write_json(tmp / MANIFEST_FILE, manifest)  # last: its presence marks a complete checkpoint
        _commit(tmp, out, overwrite)
    except BaseException:
        _remove_tree(tmp)
        raise
    return out


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """``manifest.json`` of a checkpoint, format and version checked (files not verified)."""
    root = Path(ckpt_dir).expanduser().absolute()
    if not root.is_dir():
        raise CheckpointError(f"{root} does not exist or is not a directory")
    manifest = _read_json(root / MANIFEST_FILE, "not a complete quantized checkpoint (an interrupted export "
                                                "leaves no manifest); re-export it")
    _check_format(manifest, FORMAT, root)
    return manifest


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Recompute the sha256 of every file the manifest lists; returns the manifest.

    Raises CheckpointError naming the first missing or corrupted file.
    """
    root = Path(ckpt_dir).expanduser().absolute()
    manifest = read_manifest(root)
    _verify_files(root, manifest["files"])
    return manifest


def load_quantized_parts(ckpt_dir: str | os.PathLike, *, verify: bool = True
                         ) -> tuple[dict, dict, list[Tree], list[Tree] | None]:
    """``(manifest, fp_params pure dict, folded_blocks, folded vision blocks or None)`` of a
    checkpoint written by :func:`save_quantized`."""
    root = Path(ckpt_dir).expanduser().absolute()
    manifest = verify_checkpoint(root) if verify else read_manifest(root)
    structure = _read_json(root / STRUCTURE_FILE, "the checkpoint is incomplete")
    tree = decode_tree(structure, restore_arrays(root / STATE_DIR, structure))
    blocks = [tree["blocks"][str(i)] for i in range(manifest["model"]["num_layers"])]
    _validate_blocks(blocks, _spec_of(manifest, root), f"{root}: block")
    vision = None
    if manifest.get("vision") is not None:
        vision = [tree["vision_blocks"][str(i)] for i in range(manifest["vision"]["num_blocks"])]
        _validate_blocks(vision, _spec_of(manifest["vision"], root), f"{root}: vision block")
    return manifest, tree["fp"], blocks, vision


def _spec_of(manifest: Mapping[str, Any], root: Path) -> InferenceSpec:
    """The inference spec a manifest (or its ``vision`` entry) stores; older checkpoints: the
    method config's fields of the same names."""
    try:
        return InferenceSpec.from_dict(manifest.get("inference") or manifest["method_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{root}: the manifest's inference spec is invalid: {e}") from e


def _validate_blocks(blocks: Sequence[Tree], spec: InferenceSpec, what: str) -> None:
    for i, b in enumerate(blocks):
        validate_folded_block(b, spec, f"{what} {i}")


def load_quantized_tree(ckpt_dir: str | os.PathLike, *, verify: bool = True) -> tuple[dict, dict, list[Tree]]:
    """``(manifest, fp_params pure dict, folded_blocks)`` of a checkpoint written by :func:`save_quantized`."""
    return load_quantized_parts(ckpt_dir, verify=verify)[:3]


__all__ = ["CheckpointError", "FORMAT", "FORMAT_VERSION", "decode_tree", "encode_tree", "fp_state_dict",
           "load_block", "load_block_meta", "load_quantized_parts", "load_quantized_tree",
           "model_config_from_dict", "package_versions", "read_manifest", "save_block", "save_quantized",
           "verify_checkpoint"]
