"""Reading Hugging Face checkpoints: model references, ``config.json`` and safetensors shards.

Model-agnostic; the per-model converters (``splitq_jax/models/converters/qwen2_5_vl.py``, ...) hold only their key
tables and tensor transforms, and :func:`load_state` fills a model's parameters from a checkpoint
with them. Tensors are read one at a time (bfloat16 as ``ml_dtypes.bfloat16``) and handed to jax
one at a time, so converting needs about the checkpoint's size of host memory, not twice that.
Pickle-based files (``.bin``, ``.pt``, ...) are refused, never unpickled.

Every failure a user can fix raises :class:`ConversionError` with the problem and the fix.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Collection, Iterable, Iterator, Mapping, NamedTuple, Sequence, TypeVar

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from splitq_jax.errors import SplitqError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# File types that need unpickling to read; we never do that.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a hub download fetches: configs, weights, tokenizer/processor files. No pickles.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# safetensors dtype names -> numpy; a tensor of another dtype is read through safetensors itself.
_NP_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
# XLA:CPU adopts a host buffer aligned to this many bytes instead of copying it (jax.device_put).
_ALIGN = 64


class ConversionError(SplitqError):
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
    tensor data is read only by :meth:`get` / :meth:`items`, one tensor at a time, with plain reads
    at the offsets in the header into a fresh 64-byte-aligned array. Not memory-mapped: mapped
    pages count towards the process's resident memory for as long as the shard stays open.
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
        # tensor name -> shard file, shape and where its bytes are, from the headers alone
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._spans: dict[str, tuple[str, int, int]] = {}  # dtype name, first byte, end byte in the file
        for f in files:
            for name, (shape, span) in self._read_header(f).items():
                self._where[name] = f
                self._shapes[name] = shape
                self._spans[name] = span
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

    def _read_header(self, file: str) -> dict[str, tuple[tuple[int, ...], tuple[str, int, int]]]:
        """name -> (shape, (dtype name, first byte, end byte)) of every tensor in one shard."""
        with self._open(file) as f:  # safetensors checks the header against the file size
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        # Layout: u64 little-endian header size n, n bytes of JSON header, then the data, which the
        # header's data_offsets index.
        with open(self.dir / file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        return {k: (shape, (header[k]["dtype"], 8 + n + header[k]["data_offsets"][0],
                            8 + n + header[k]["data_offsets"][1]))
                for k, shape in shapes.items()}

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
        with open(self.dir / self._where[name], "rb", buffering=0) as fh:
            return self._read(fh, name)

    def items(self, names: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """All tensors (or those in ``names``), shard by shard, each shard opened once and read in
        file order. The caller holds only what it keeps of each array."""
        by_file: dict[str, list[str]] = {}
        for name, file in self._where.items():
            if names is None or name in names:
                by_file.setdefault(file, []).append(name)
        for file, file_names in by_file.items():
            with open(self.dir / file, "rb", buffering=0) as fh:
                for name in sorted(file_names, key=lambda k: self._spans[k][1]):
                    yield name, self._read(fh, name)

    def _read(self, fh, name: str) -> np.ndarray:
        dtype, first, end = self._spans[name]
        if dtype not in _NP_DTYPES:  # rare dtypes: let safetensors decode them
            with self._open(self._where[name]) as f:
                return self._get_tensor(f, name)
        out = aligned_empty(self._shapes[name], _NP_DTYPES[dtype])
        buf = memoryview(out.reshape(-1).view(np.uint8))
        fh.seek(first)
        done = 0
        while done < len(buf):  # one read() returns at most ~2 GiB on Linux
            got = fh.readinto(buf[done:])
            if not got:
                break
            done += got
        if done != end - first or len(buf) != end - first:
            raise ConversionError(f"cannot read tensor {name!r} from {self._where[name]!r} in {self.dir} "
                                  f"(got {done} of {end - first} bytes); the shard is corrupted, re-download it")
        return out

    def _get_tensor(self, handle, name: str) -> np.ndarray:
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise ConversionError(f"cannot read tensor {name!r} from {self._where[name]!r} in {self.dir} "
                                  f"({e}); the shard is corrupted, re-download it") from e


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary, so that
    ``jax.device_put`` on CPU adopts it rather than copying it."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    first = -raw.ctypes.data % _ALIGN
    return raw[first:first + nbytes].view(dtype).reshape(shape)


def open_checkpoint(model_dir: str | os.PathLike) -> SafetensorsCheckpoint:
    """:class:`SafetensorsCheckpoint` for a checkpoint directory."""
    return SafetensorsCheckpoint(model_dir)


# --------------------------------------------------------------------------------------------
# Checkpoint -> model
# --------------------------------------------------------------------------------------------

ParamPath = tuple  # a parameter's path in an NNX state: attribute names, ints for list indices
Transform = Callable[[np.ndarray], np.ndarray]  # a checkpoint tensor -> its parameter's shape
M = TypeVar("M", bound=nnx.Module)


class KeyRule(NamedTuple):
    """One checkpoint key pattern of a family and the parameter path it maps to."""

    pattern: str  # regex, matched in full against the normalised key
    path: tuple[str, ...]  # parts formatted with the match's named groups; all-digit parts become ints
    names: Mapping[str, str] | None = None  # renames group ``p`` (HF weight / bias -> w / b / scale ...)
    transform: str | None = None  # the tensor needs this transform (a key of load_state's transforms)


class KeyMap:
    """Checkpoint keys -> parameter paths of one family.

    ``prefixes`` (checked in order, the first match wins) bring every key spelling in use to one
    normal form; the first rule whose pattern matches the normal form gives the path. Calling it
    returns ``(path, transform name or None)``, or None for a key that is no weight of the family.
    """

    def __init__(self, prefixes: Sequence[tuple[str, str]], rules: Sequence[KeyRule]):
        self.prefixes = tuple(prefixes)
        self.rules = [(re.compile(rule.pattern), rule) for rule in rules]

    def normalise(self, key: str) -> str | None:
        for prefix, repl in self.prefixes:
            if key.startswith(prefix):
                return repl + key[len(prefix):]
        return None

    def __call__(self, key: str) -> tuple[ParamPath, str | None] | None:
        norm = self.normalise(key)
        if norm is None:
            return None
        for pattern, rule in self.rules:
            m = pattern.fullmatch(norm)
            if m is None:
                continue
            groups = m.groupdict()
            if rule.names is not None and "p" in groups:
                groups["p"] = rule.names[groups["p"]]
            parts = (part.format(**groups) for part in rule.path)
            return tuple(int(part) if part.isdigit() else part for part in parts), rule.transform
        return None

    def key_for(self, path: ParamPath, spelling: Sequence[tuple[str, str]]) -> tuple[str, str | None]:
        """The inverse: the checkpoint key of parameter ``path`` and the transform its tensor went
        through on loading.

        ``spelling`` maps normal-form prefixes (``"lm."``) to the prefixes written (``"model."``),
        first match wins. The key is rebuilt from the first rule whose path template fits ``path``
        and checked by mapping it forward again, so a table that is not invertible fails here
        (KeyError) instead of writing a key that loads as another parameter.
        """
        parts = tuple(str(p) for p in path)
        for pattern, rule in self.rules:
            groups = _fit_template(rule.path, parts, rule.names)
            if groups is None:
                continue
            norm = _NAMED_GROUP.sub(lambda m: groups.get(m.group(1), m.group(0)), pattern.pattern).replace("\\.", ".")
            if not pattern.fullmatch(norm):
                continue
            key = next((out + norm[len(pre):] for pre, out in spelling if norm.startswith(pre)), None)
            want = (tuple(int(p) if p.isdigit() else p for p in parts), rule.transform)
            if key is None or self(key) != want:
                raise KeyError(f"the key table cannot write {'.'.join(parts)} (rebuilt {key or norm!r}); "
                               f"the spelling {spelling} does not fit it")
            return key, rule.transform
        raise KeyError(f"no checkpoint key maps to {'.'.join(parts)}")


_NAMED_GROUP = re.compile(r"\(\?P<(\w+)>[^()]*\)")


def _fit_template(template: Sequence[str], parts: Sequence[str], names: Mapping[str, str] | None
                  ) -> dict[str, str] | None:
    """The named groups that make ``template`` (parts like ``"{i}"`` or literals) read ``parts``;
    group ``p`` is mapped back through ``names`` (``w`` -> ``weight``). None when it does not fit."""
    if len(template) != len(parts):
        return None
    groups: dict[str, str] = {}
    for t, v in zip(template, parts):
        if t.startswith("{") and t.endswith("}"):
            name = t[1:-1]
            if name == "p" and names is not None:
                back = [k for k, w in names.items() if w == v]
                if not back:
                    return None
                v = back[0]
            if groups.setdefault(name, v) != v:
                return None
        elif t != v:
            return None
    return groups


def load_state(abstract_model: M, ckpt: SafetensorsCheckpoint,
               key_map: Callable[[str], tuple[ParamPath, str | None] | None], *, family: str,
               transforms: Mapping[str, Transform] | None = None, ignored: re.Pattern | None = None,
               tolerated: Collection[ParamPath] = ()) -> M:
    """``abstract_model`` (``jax.ShapeDtypeStruct`` leaves) with every parameter read from ``ckpt``.

    Args:
      key_map: checkpoint key -> (parameter path, transform name or None), or None for a key
        that is no weight of ``family`` (a :class:`KeyMap`).
      family: the model family's name, for error messages.
      transforms: transform name -> function; a transform is a reshape (the tensor must hold as
        many elements as its parameter); without one the shapes must be equal.
      ignored: keys that hold no weights (derived buffers); skipped.
      tolerated: parameter paths a checkpoint may hold although the model has none (a tied LM
        head's copy of the embeddings); skipped.

    Every parameter must be found exactly once and with the right shape; this is checked on the
    headers, before any tensor data is read. Tensors are then read one at a time and cast to the
    dtype of their parameter; on CPU the array handed to jax is the one read from disk (no copy),
    so the host holds about the checkpoint's size, whatever the number of shards.
    """
    graphdef, state = nnx.split(abstract_model)
    expected = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    plan: dict[str, tuple[ParamPath, Transform | None]] = {}  # checkpoint key -> (parameter path, transform)
    sources: dict[ParamPath, str] = {}
    unexpected = []
    for key in ckpt.keys():
        mapped = key_map(key)
        if mapped is None:
            if ignored is None or not ignored.fullmatch(key):
                unexpected.append(key)
            continue
        path, name = mapped
        if path not in expected:
            if path not in tolerated:
                unexpected.append(key)
            continue
        if path in sources:
            raise ConversionError(f"{key!r} and {sources[path]!r} both map to {'.'.join(map(str, path))}; "
                                  f"the checkpoint mixes two key spellings, keep one")
        fn = None if name is None else (transforms or {})[name]
        want, got = tuple(expected[path].shape), tuple(ckpt.shape(key))
        if int(np.prod(got)) != int(np.prod(want)) or (fn is None and got != want):
            raise ConversionError(f"{key!r} has shape {got} but the model expects {want}; "
                                  f"config.json does not describe these weights")
        plan[key] = (path, fn)
        sources[path] = key
    if unexpected:
        raise ConversionError(f"{len(unexpected)} checkpoint tensors are not {family} weights "
                              f"(first: {unexpected[:3]}); is this the right checkpoint for this converter?")
    missing = [".".join(map(str, p)) for p in expected if p not in sources]
    if missing:
        raise ConversionError(f"{len(missing)} model parameters are missing from the checkpoint "
                              f"(first: {missing[:3]}); the checkpoint is incomplete, re-download it")

    pure: dict = {}
    for key, arr in ckpt.items(plan):
        path, fn = plan[key]
        node = pure
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _to_jax(arr if fn is None else fn(arr), expected[path].dtype)
        del arr  # the jax array holds the only reference (CPU) or its own copy (accelerators)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _to_jax(arr: np.ndarray, dtype) -> jax.Array:
    """``arr`` as a jax array of ``dtype``; the cast, if any, goes into an aligned buffer so that it
    too is adopted rather than copied."""
    if arr.dtype != dtype or not arr.flags.c_contiguous or arr.ctypes.data % _ALIGN:
        out = aligned_empty(arr.shape, dtype)
        np.copyto(out, arr, casting="unsafe")
        arr = out
    return jax.device_put(arr)
