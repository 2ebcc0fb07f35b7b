"""Folded trees <-> a JSON structure plus flat arrays, and the arrays <-> an orbax directory.

The structure encoding (``kind``: ``dict`` | ``list`` | ``tuple`` | ``packed`` | ``array`` |
``value`` | ``null``) keeps dict key types (NNX list indices are ints) and order, array shapes and
dtypes, so decoding rebuilds the exact pytree: same treedef (including
:class:`~splitq_jax.packing.PackedTensor` metadata), same dtypes, bit-identical values. Zero-size
arrays and None leaves live in the structure only (orbax refuses them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax.fsutil import OCDBT_FILE_BYTES
from splitq_jax.packing import PackedTensor
from splitq_jax.quantized.schema import CheckpointError

Tree = Any


# --------------------------------------------------------------------------------------------
# Tree encoding: JSON structure + a nested dict of arrays for orbax
# --------------------------------------------------------------------------------------------


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def encode_tree(tree: Tree) -> tuple[dict, dict[tuple[str, ...], Any]]:
    """``(structure, arrays)``: a JSON-able description of ``tree`` and its non-empty arrays keyed
    by path (the path of a PackedTensor leaf ends in ``qvalue`` / ``scale`` / ``zero_point``)."""
    arrays: dict[tuple[str, ...], Any] = {}

    def enc(node: Any, path: tuple[str, ...]) -> dict:
        if node is None:
            return {"kind": "null"}
        if isinstance(node, PackedTensor):
            meta = {"bits": int(node.bits), "shape": [int(s) for s in node.shape], "symmetric": bool(node.symmetric),
                    "group_size": None if node.group_size is None else int(node.group_size),
                    "word_dtype": str(node.word_dtype)}
            return {"kind": "packed", "meta": meta,
                    **{f: enc(getattr(node, f), path + (f,)) for f in ("qvalue", "scale", "zero_point")}}
        if isinstance(node, Mapping):
            items, seen = [], set()
            for k, v in node.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"cannot save key {k!r} at {'/'.join(path) or '<root>'}: keys must be str or int")
                if str(k) in seen:
                    raise TypeError(f"keys {k!r} and {str(k)!r} collide at {'/'.join(path) or '<root>'}")
                seen.add(str(k))
                items.append([k, enc(v, path + (str(k),))])
            return {"kind": "dict", "items": items}
        if isinstance(node, (list, tuple)):
            if type(node) not in (list, tuple):  # NamedTuples and other subclasses would come back plain
                _unsupported(node, path)
            return {"kind": type(node).__name__, "items": [enc(v, path + (str(i),)) for i, v in enumerate(node)]}
        if _is_array(node):
            shape, dtype = tuple(int(s) for s in np.shape(node)), jnp.dtype(node.dtype)
            if dtype == np.dtype(object):
                _unsupported(node, path)
            if int(np.prod(shape)):  # orbax refuses zero-size arrays; shape and dtype say it all
                arrays[path] = np.asarray(node) if isinstance(node, np.generic) else node
            return {"kind": "array", "shape": list(shape), "dtype": dtype.name}
        if isinstance(node, (bool, int, float, str)):
            return {"kind": "value", "value": node}
        return _unsupported(node, path)

    return enc(tree, ()), arrays


def _unsupported(node: Any, path: tuple[str, ...]):
    raise TypeError(f"cannot save a {type(node).__name__} at {'/'.join(path) or '<root>'}")


def decode_tree(structure: dict, arrays: Mapping[tuple[str, ...], Any]) -> Tree:
    """Inverse of :func:`encode_tree`."""

    def dec(node: dict, path: tuple[str, ...]) -> Any:
        kind = node["kind"]
        if kind == "null":
            return None
        if kind == "packed":
            m = node["meta"]
            return PackedTensor(
                *(dec(node[f], path + (f,)) for f in ("qvalue", "scale", "zero_point")),
                bits=m["bits"], shape=tuple(m["shape"]), symmetric=m["symmetric"],
                group_size=m["group_size"], word_dtype=m["word_dtype"])
        if kind == "dict":
            return {k: dec(v, path + (str(k),)) for k, v in node["items"]}
        if kind in ("list", "tuple"):
            items = [dec(v, path + (str(i),)) for i, v in enumerate(node["items"])]
            return items if kind == "list" else tuple(items)
        if kind == "array":
            shape, dtype = tuple(node["shape"]), jnp.dtype(node["dtype"])
            if not int(np.prod(shape)):
                return jnp.zeros(shape, dtype)
            a = arrays[path]
            if tuple(a.shape) != shape or jnp.dtype(a.dtype) != dtype:
                raise CheckpointError(f"array {'.'.join(path)} is {a.dtype}{list(a.shape)}, "
                                      f"the structure says {dtype.name}{list(shape)}")
            return a
        if kind == "value":
            return node["value"]
        raise CheckpointError(f"unknown node kind {kind!r} at {'.'.join(path)}")

    return dec(structure, ())


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def _flatten(nested: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in nested.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _abstract(structure: dict) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """The restore target of every non-empty array in ``structure``."""
    out = {}

    def walk(node: dict, path: tuple[str, ...]) -> None:
        kind = node["kind"]
        if kind == "array" and int(np.prod(node["shape"])):
            out[path] = jax.ShapeDtypeStruct(tuple(node["shape"]), jnp.dtype(node["dtype"]))
        elif kind == "packed":
            for f in ("qvalue", "scale", "zero_point"):
                walk(node[f], path + (f,))
        elif kind == "dict":
            for k, v in node["items"]:
                walk(v, path + (str(k),))
        elif kind in ("list", "tuple"):
            for i, v in enumerate(node["items"]):
                walk(v, path + (str(i),))

    walk(structure, ())
    return out


# --------------------------------------------------------------------------------------------
# Files: orbax arrays, JSON, checksums, fsync, atomic rename
# --------------------------------------------------------------------------------------------



def save_arrays(path: Path, arrays: Mapping[tuple[str, ...], Any]) -> None:
    import orbax.checkpoint as ocp

    if not arrays:  # orbax needs at least one array; an empty state directory is still a directory
        path.mkdir()
        return
    # Orbax buffers each OCDBT data file in memory up to its target size (2 GiB by default, i.e. the
    # whole model); small data files keep the save's extra host memory near 0.3 GB (bench/convert_memory.py).
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        checkpointer.save(path, args=ocp.args.PyTreeSave(_nest(arrays), ocdbt_target_data_file_size=OCDBT_FILE_BYTES))
    finally:
        checkpointer.close()


def restore_arrays(path: Path, structure: dict) -> dict[tuple[str, ...], Any]:
    import orbax.checkpoint as ocp

    target = _abstract(structure)
    if not target:
        return {}
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(path, _nest(target))
    except Exception as e:  # orbax raises many types; the caller wants to know which checkpoint
        raise CheckpointError(f"cannot read the arrays in {path}: {type(e).__name__}: {e}") from e
    finally:
        checkpointer.close()
    return _flatten(restored)
