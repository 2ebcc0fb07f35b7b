"""What running a quantized checkpoint needs to know, and nothing about how it was made.

:class:`InferenceSpec` is the only setting the inference path (``runtime``, ``qlinear``, the
folded block forward) reads. A checkpoint's manifest stores it under ``"inference"``, apart from
the method's configuration (provenance), so a checkpoint written by a method this version does not
know still loads and runs as long as its folded blocks use the stored format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from splitq_jax.errors import SplitqError
from splitq_jax.modality import TEXT_TOKENS
from splitq_jax.quant import check_bits

MAIN_PATHS = ("masked", "gathered")


class CheckpointError(SplitqError):
    """A checkpoint directory that is missing, incomplete, corrupted or of another format."""


@dataclass(frozen=True, kw_only=True)
class InferenceSpec:
    """Bit widths of weights and activations (None: float), their symmetry, how the main group's
    input is formed (``main_path``: full width with outlier columns zeroed, or gathered) and which
    tokens count as text for text-only branches (``text_tokens``)."""

    w_bits: int | None
    a_bits: int | None
    w_symmetric: bool = True
    a_symmetric: bool = True
    main_path: str = "masked"
    text_tokens: str = "non_vision"

    def __post_init__(self) -> None:
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        if self.main_path not in MAIN_PATHS:
            raise ValueError(f"unknown main_path {self.main_path!r}: choose one of {', '.join(MAIN_PATHS)}")
        if self.text_tokens not in TEXT_TOKENS:
            raise ValueError(f"unknown text_tokens {self.text_tokens!r}: choose one of {', '.join(TEXT_TOKENS)}")

    @property
    def bits(self) -> str:
        return f"w{self.w_bits or 16}a{self.a_bits or 16}"

    @classmethod
    def of(cls, cfg: Any) -> "InferenceSpec":
        """The spec of any configuration carrying these fields (an engine or method config)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InferenceSpec":
        """From a manifest's ``"inference"`` entry, or from an older manifest's method config (its
        other keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ folded blocks
#
# A folded block, the one stored format of every method (shapes for a group input of width d,
# main width km = d with the masked main path or len(main_idx) with the gathered one)::
#
#   {"norms": {norm: {"scale": (d,), "bias"?: (d,)}},
#    "groups": {group: {
#       "acts": {"transform": None | {"p1": (n1, n1), "p2": (n2, n2), "c"?: (km,)} | {"p": (km, km)},
#                "act_clip": None | {"max": (), "min": ()},
#                "text" | "vision": None | {"transform": None | {"p": (k, k)}, "act_clip": ...}},
#       "split": {"main_mask": None | (d,), "main_idx": None | (km',), "text_idx": (k_t,), "vision_idx": (k_v,)},
#       "weights": {name: {"main": (d_out, km), "cws"? | "mac"?: {"l_in": (r, km), "l_out": (d_out, r)},
#                          "text"?: (d_out, k_t), "vision"?: (d_out, k_v)}},
#       "biases": {name: None | (d_out,)}}}}
#
# Weights are PackedTensors (their ``shape`` is the unpacked one) or float arrays. ``main_mask``
# and ``main_idx`` are None together when the main part is every channel in order (the canonical
# fold's form: the runtime then feeds the group input as it is).


def _shape(x: Any) -> tuple[int, ...] | None:
    s = getattr(x, "shape", None)
    return None if s is None else tuple(int(v) for v in s)


def validate_folded_block(block: Any, spec: InferenceSpec, where: str = "block") -> None:
    """Raise :class:`CheckpointError` naming the first path of ``block`` that breaks the schema
    above (missing or unknown keys, inconsistent widths, out-of-range channel indices)."""

    def fail(path: str, msg: str) -> None:
        raise CheckpointError(f"{where}: {path}: {msg}; the folded block does not follow the stored format")

    def want(x: Any, shape: tuple[int, ...], path: str) -> None:
        if _shape(x) != shape:
            fail(path, f"has shape {_shape(x)}, expected {shape}")

    def keys(node: Any, required: set[str], optional: set[str], path: str) -> None:
        if not isinstance(node, dict):
            fail(path, f"is a {type(node).__name__}, expected a mapping")
        missing, extra = required - set(node), set(node) - required - optional
        if missing or extra:
            fail(path, f"has keys {sorted(node)}; missing {sorted(missing)}, unknown {sorted(extra)}")

    def clip(node: Any, path: str) -> None:
        if node is not None:
            keys(node, {"max", "min"}, set(), path)

    keys(block, {"norms", "groups"}, set(), "<root>")
    for norm, params in block["norms"].items():
        keys(params, {"scale"}, {"bias"}, f"norms/{norm}")
        for k, v in params.items():
            if len(_shape(v) or ()) != 1:
                fail(f"norms/{norm}/{k}", f"has shape {_shape(v)}, expected a vector")
    for g, f in block["groups"].items():
        p = f"groups/{g}"
        keys(f, {"acts", "split", "weights", "biases"}, set(), p)
        keys(f["split"], {"main_mask", "main_idx", "text_idx", "vision_idx"}, set(), f"{p}/split")
        split = f["split"]
        if split["main_mask"] is None:  # canonical form: the main part is every channel, in order
            if split["main_idx"] is not None:
                fail(f"{p}/split/main_idx", "must be None with main_mask None (the main part is every channel)")
            mains = [_shape(w.get("main")) for w in f["weights"].values() if isinstance(w, dict)]
            d = mains[0][1] if mains and mains[0] is not None and len(mains[0]) == 2 else None
            if d is None:
                fail(f"{p}/weights", "has no main weight to give the input width")
        else:
            (d,) = _shape(split["main_mask"]) or (None,)
            if d is None:
                fail(f"{p}/split/main_mask", "is not a vector")
        widths = {k: (_shape(split[f"{k}_idx"]) or (d if k == "main" else -1,))[0]
                  for k in ("main", "text", "vision")}
        if split["main_mask"] is None and (widths["text"] > 0 or widths["vision"] > 0):
            fail(f"{p}/split", "has outlier channels but no main_mask")
        for k, n in widths.items():
            if split[f"{k}_idx"] is None:
                continue
            idx = np.asarray(split[f"{k}_idx"])
            if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= d)):
                fail(f"{p}/split/{k}_idx", f"must be a vector of channel indices in [0, {d})")
        km = d if spec.main_path == "masked" or split["main_idx"] is None else widths["main"]
        acts = f["acts"]
        keys(acts, {"transform", "act_clip"}, {"text", "vision"}, f"{p}/acts")
        t = acts["transform"]
        if t is not None:
            if "p" in t:
                keys(t, {"p"}, set(), f"{p}/acts/transform")
                want(t["p"], (km, km), f"{p}/acts/transform/p")
            else:
                keys(t, {"p1", "p2"}, {"c"}, f"{p}/acts/transform")
                n1, n2 = (_shape(t["p1"]) or (0,))[0], (_shape(t["p2"]) or (0,))[0]
                want(t["p1"], (n1, n1), f"{p}/acts/transform/p1")
                want(t["p2"], (n2, n2), f"{p}/acts/transform/p2")
                if n1 * n2 != km:
                    fail(f"{p}/acts/transform", f"acts on {n1} x {n2} = {n1 * n2} channels, the main width is {km}")
                if "c" in t:
                    want(t["c"], (km,), f"{p}/acts/transform/c")
        clip(acts["act_clip"], f"{p}/acts/act_clip")
        for k in ("text", "vision"):
            o, n = acts.get(k), widths[k]
            if (o is not None) != (n > 0):
                fail(f"{p}/acts/{k}", f"is {'present' if o is not None else 'absent'} but the group has {n} {k} channels")
            if o is not None:
                keys(o, {"transform", "act_clip"}, set(), f"{p}/acts/{k}")
                if o["transform"] is not None:
                    keys(o["transform"], {"p"}, set(), f"{p}/acts/{k}/transform")
                    want(o["transform"]["p"], (n, n), f"{p}/acts/{k}/transform/p")
                clip(o["act_clip"], f"{p}/acts/{k}/act_clip")
        if set(f["weights"]) != set(f["biases"]):
            fail(f"{p}/biases", f"names {sorted(f['biases'])} differ from the weights' {sorted(f['weights'])}")
        for name, w in f["weights"].items():
            q = f"{p}/weights/{name}"
            keys(w, {"main"}, {"cws", "mac", "text", "vision"}, q)
            main = _shape(w["main"])
            if main is None or len(main) != 2 or main[1] != km:
                fail(f"{q}/main", f"has shape {main}, expected (d_out, {km})")
            d_out = main[0]
            for b in ("cws", "mac"):
                if b in w:
                    keys(w[b], {"l_in", "l_out"}, set(), f"{q}/{b}")
                    r = (_shape(w[b]["l_in"]) or (0,))[0]
                    want(w[b]["l_in"], (r, km), f"{q}/{b}/l_in")
                    want(w[b]["l_out"], (d_out, r), f"{q}/{b}/l_out")
            for k in ("text", "vision"):
                if (k in w) != (widths[k] > 0):
                    fail(f"{q}/{k}", f"is {'present' if k in w else 'absent'} but the group has {widths[k]} {k} channels")
                if k in w:
                    want(w[k], (d_out, widths[k]), f"{q}/{k}")
            if f["biases"][name] is not None:
                want(f["biases"][name], (d_out,), f"{p}/biases/{name}")
