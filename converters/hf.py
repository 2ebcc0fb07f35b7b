"""Reading Hugging Face checkpoints: model references, ``config.json`` and safetensors shards.

Model-agnostic; the per-model converters (``converters/qwen2_5_vl.py``, ...) map tensor names onto
their Flax modules. Tensors are streamed one at a time from memory-mapped safetensors files with
``framework="numpy"`` (bfloat16 arrives as ``ml_dtypes.bfloat16``), so a checkpoint is never held
in memory twice. Pickle-based files (``.bin``, ``.pt``, ...) are refused, never unpickled.

Every failure a user can fix raises :class:`ConversionError` with the problem and the fix.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from safetensors import safe_open

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# File types that need unpickling to read; we never do that.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a hub download fetches: configs, weights, tokenizer/processor files. No pickles.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ConversionError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says how to fix it."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model_dir(ref: str | os.PathLike) -> Path:
    """A local directory for a model reference: an existing directory, or a hub id (``owner/name``).

    Hub ids are fetched with ``huggingface_hub.snapshot_download`` (configs and safetensors only).
    With ``HF_HUB_OFFLINE=1`` only the local hub cache is consulted.
    """
    path = Path(os.path.expanduser(str(ref)))
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{ref!s} is a file; pass the checkpoint directory that holds config.json "
                              f"and the *.safetensors files")
    text = str(ref)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ConversionError(f"model directory {text!r} does not exist; pass an existing directory with "
                              f"config.json and *.safetensors, or a hub id like 'Qwen/Qwen2.5-VL-3B-Instruct'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise ConversionError(f"{text!r} is not a local directory and huggingface_hub is not installed; "
                              f"pass a local directory") from e
    offline = _offline()
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline))
    except Exception as e:  # network down, repo missing, gated, not cached while offline, ...
        why = "HF_HUB_OFFLINE=1 is set and it is not in the local hub cache" if offline else \
              f"the download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        raise ConversionError(
            f"cannot fetch {text!r} from the Hugging Face hub: {why}. Download it where there is network "
            f"(e.g. `huggingface-cli download {text} --include '*.json' '*.safetensors' --local-dir DIR`) "
            f"and pass that directory instead of the hub id") from e


def read_config(model_dir: str | os.PathLike) -> dict:
    """Parsed ``config.json`` of a checkpoint directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{model_dir!s} has no config.json; pass the directory of an HF checkpoint "
                              f"(the one save_pretrained wrote or the hub snapshot)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from e


def require_architecture(config: dict, supported: Iterable[str]) -> str:
    """The checkpoint's architecture name, if it is one of ``supported``; otherwise ConversionError."""
    supported = tuple(supported)
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in supported:
            return arch
    raise ConversionError(f"unsupported architecture {archs or config.get('model_type')!r} in config.json; "
                          f"this converter reads {', '.join(supported)}; use the converter for that model family")


class SafetensorsCheckpoint:
    """Lazy, read-only view of a checkpoint's tensors (single file or sharded with an index).

    Opening checks that every shard exists and has a readable header (truncated files fail here);
    tensor data is read only by :meth:`get` / :meth:`items`, one tensor at a time.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"model directory {str(model_dir)!r} does not exist")
        index = self.dir / SAFETENSORS_INDEX
        single = self.dir / SAFETENSORS_SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index} is not a valid safetensors index (needs a 'weight_map'); "
                                      f"re-download or re-save the checkpoint") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise ConversionError(f"shard(s) {missing} listed in {SAFETENSORS_INDEX} are missing from "
                                      f"{self.dir}; re-download the checkpoint so that every shard is present")
        elif single.is_file():
            files = [SAFETENSORS_SINGLE]
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
                if pickles:
                    raise ConversionError(
                        f"{self.dir} holds only pickle checkpoints {pickles}; they are refused because loading "
                        f"them runs arbitrary code. Convert them to safetensors where you trust the file "
                        f"(e.g. `model.save_pretrained(dir, safe_serialization=True)`) or download the "
                        f"*.safetensors files")
                raise ConversionError(f"no *.safetensors files in {self.dir}; pass a checkpoint directory")
        # tensor name -> shard file, read from the headers (cheap: safetensors memory-maps the data)
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            for name, shape in self._read_header(f).items():
                self._where[name] = f
                self._shapes[name] = shape
        if index.is_file():
            absent = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if absent:
                raise ConversionError(f"{len(absent)} tensors listed in {SAFETENSORS_INDEX} are not in their "
                                      f"shard (first: {absent[0]!r}); the checkpoint is inconsistent, re-download it")

    def _open(self, file: str):
        try:
            return safe_open(str(self.dir / file), framework="numpy")
        except Exception as e:  # SafetensorError: truncated / corrupted header or data
            raise ConversionError(f"shard {file!r} in {self.dir} is corrupted or truncated ({e}); "
                                  f"re-download that file") from e

    def _read_header(self, file: str) -> dict[str, tuple[int, ...]]:
        with self._open(file) as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def get(self, name: str) -> np.ndarray:
        """One tensor as numpy (bfloat16 as ``ml_dtypes.bfloat16``)."""
        if name not in self._where:
            raise ConversionError(f"tensor {name!r} is not in the checkpoint at {self.dir}")
        with self._open(self._where[name]) as f:
            return self._read(f, name)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """All tensors, shard by shard, each shard opened once."""
        by_file: dict[str, list[str]] = {}
        for name, file in self._where.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with self._open(file) as f:
                for name in names:
                    yield name, self._read(f, name)

    def _read(self, handle, name: str) -> np.ndarray:
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise ConversionError(f"cannot read tensor {name!r} from {self._where[name]!r} in {self.dir} "
                                  f"({e}); the shard is corrupted, re-download it") from e


def open_checkpoint(model_dir: str | os.PathLike) -> SafetensorsCheckpoint:
    """:class:`SafetensorsCheckpoint` for a checkpoint directory."""
    return SafetensorsCheckpoint(model_dir)
