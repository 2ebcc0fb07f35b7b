"""Method configuration: every method is a setting of one engine.

``rtn``, ``smoothquant``, ``flatquant`` and ``splitq`` are presets of :class:`MethodConfig`; every
component and every [choice] point of ``splitq-method.md`` is a field, so any ablation is a
``dataclasses.replace`` away. Names match the CLI flags and reports (``w4a4``, ``main`` / ``text`` /
``vision`` channel groups, ``cws``, ``mac``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from splitq_jax.errors import SplitqError
from splitq_jax.quantized.schema import MAIN_PATHS
from splitq_jax.modality import TEXT_TOKENS
from splitq_jax.quant import check_bits

METHODS = ("rtn", "smoothquant", "flatquant", "splitq")
BIT_PRESETS = ("w4a8", "w4a4", "w3a3", "w3a2")
SELECTORS = ("none", "mocd", "random", "text_max", "vision_max", "all_max", "all_mean")


class ConfigError(SplitqError):
    """An invalid method configuration."""


def parse_bits(spec: str) -> tuple[int | None, int | None]:
    """``"w4a8"`` -> ``(4, 8)``; ``"w16a16"`` means float (``(None, None)``)."""
    m = re.fullmatch(r"w(\d+)a(\d+)", spec.strip().lower())
    if not m:
        raise ConfigError(f"bit width {spec!r} is not of the form wXaY (e.g. w4a4, w3a3, w4a8)")
    w, a = (None if int(v) >= 16 else int(v) for v in m.groups())
    check_bits(w)
    check_bits(a)
    return w, a


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    method: str = "splitq"

    # --- bit widths (None: that quantizer is off) -------------------------------------------
    w_bits: int | None = 4
    a_bits: int | None = 4
    w_symmetric: bool = True
    a_symmetric: bool = True
    w_group_size: int | None = None

    # --- main-path transform (Eq. 2, 15) ------------------------------------------------------
    transform: bool = True  # Kronecker transform on the main path
    transform_groups: str = "all"  # which group inputs get it: "all" or "norm_fed" (a norm feeds them)
    rotation_init: str = "random"  # "random" orthogonal factors or "identity"
    diag_init: str = "smooth"  # "smooth" (SmoothQuant-style c) or "ones"
    smooth_alpha: float = 0.3
    learn_transform: bool = True  # train P1, P2
    learn_diag: bool = True  # train c
    learn_clip: bool = True  # train weight/activation clipping logits

    # --- channel split, MOCD (Eq. 4-14) -------------------------------------------------------
    selector: str = "mocd"  # one of SELECTORS; "none" = no split
    text_ratio: float = 0.02
    vision_ratio: float = 0.02
    n_clusters: int = 3  # K of Eq. 10
    instability: str = "kmeans"  # [choice] "kmeans" (Eq. 10) or "variance"
    empty_cluster: str = "farthest"  # k-means empty-cluster rule: "farthest" (sklearn) or "keep" the centre
    kmeans_starts: int = 2  # k-means starts per channel (Eq. 10), lowest inertia kept; = mocd.KMEANS_STARTS
    outlier_init: str = "identity"  # [choice] P_t / P_v start: "identity" or "random"
    main_path: str = "masked"  # [choice] "masked" (full width, zeroed columns) or "gathered"
    mocd_o_proj: bool = False  # [choice] split o_proj's input too
    text_tokens: str = "non_vision"  # [choice] "non_vision" or "answer" (answer tokens only)

    # --- ACC (Eq. 16-21) ------------------------------------------------------------------------
    cws: bool = True
    mac: bool = True
    cws_ratio: float = 0.02
    mac_ratio: float = 0.03
    mac_gate_init: float = 0.0  # [choice]
    learn_gates: bool = True  # False = frozen SVD branches (paper A.2 ablation)
    svd_of: str = "weight"  # [choice] SVD of W_m ("weight", Eq. 20) or of P0^-1 W_m ("transformed")

    # --- calibration recipe -------------------------------------------------------------------
    epochs: int = 15
    batch_size: int = 4
    lr: float = 5e-3  # transforms, scales, gates
    clip_lr: float = 5e-2  # clipping logits
    weight_decay: float = 0.01
    final_lr_ratio: float = 1e-3
    normalize_loss: bool = True  # FlatQuant: loss / stop_gradient(loss)
    loss_text_weight: float = 1.0  # [choice] per-token modality weights of the block MSE
    loss_vision_weight: float = 1.0
    block_inputs: str = "fp"  # [choice] "fp" or "quantized" outputs of the previous block
    weight_solver: str = "rtn"  # main weights at the fold: round to nearest ("rtn") or GPTQ ("gptq")
    seed: int = 0

    def __post_init__(self) -> None:
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        _one_of("method", self.method, METHODS)
        _one_of("selector", self.selector, SELECTORS)
        _one_of("rotation_init", self.rotation_init, ("random", "identity"))
        _one_of("transform_groups", self.transform_groups, ("all", "norm_fed"))
        _one_of("diag_init", self.diag_init, ("smooth", "ones"))
        _one_of("instability", self.instability, ("kmeans", "variance"))
        _one_of("outlier_init", self.outlier_init, ("identity", "random"))
        _one_of("empty_cluster", self.empty_cluster, ("keep", "farthest"))
        _one_of("main_path", self.main_path, MAIN_PATHS)
        _one_of("text_tokens", self.text_tokens, TEXT_TOKENS)
        _one_of("svd_of", self.svd_of, ("weight", "transformed"))
        _one_of("block_inputs", self.block_inputs, ("fp", "quantized"))
        _one_of("weight_solver", self.weight_solver, WEIGHT_SOLVERS)
        if self.weight_solver == "gptq" and self.w_bits is None:
            raise ConfigError("--weight-solver gptq rounds weights: give a weight bit width (--bits w4a4, w4a16, ...)")
        for f in dataclasses.fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), (bool, np.bool_)):
                raise ConfigError(f"{_flag(f.name)} must be true or false, got {getattr(self, f.name)!r}")
        # Every number is checked here, where flags, --config files and the Python API all pass,
        # so that a NaN learning rate or a negative rank never reaches a calibration.
        for name in ("text_ratio", "vision_ratio", "cws_ratio", "mac_ratio"):
            check_number(name, getattr(self, name), lo=0.0, hi=1.0, hi_open=True)
        if self.text_ratio + self.vision_ratio >= 1.0:
            raise ConfigError(
                f"text_ratio + vision_ratio = {self.text_ratio + self.vision_ratio} leaves no main "
                "channels; keep their sum well below 1 (the paper uses 0.02 each)"
            )
        check_number("smooth_alpha", self.smooth_alpha, lo=0.0, hi=1.0)
        check_number("mac_gate_init", self.mac_gate_init)
        check_number("lr", self.lr, lo=0.0)
        check_number("clip_lr", self.clip_lr, lo=0.0)
        check_number("weight_decay", self.weight_decay, lo=0.0)
        check_number("final_lr_ratio", self.final_lr_ratio, lo=0.0, hi=1.0)
        check_number("loss_text_weight", self.loss_text_weight, lo=0.0)
        check_number("loss_vision_weight", self.loss_vision_weight, lo=0.0)
        if self.loss_text_weight == 0 and self.loss_vision_weight == 0:
            raise ConfigError("loss_text_weight and loss_vision_weight are both 0, so the block loss would "
                              "weigh no token; give at least one of them a positive weight (default 1)")
        check_number("n_clusters", self.n_clusters, lo=1, integer=True)
        check_number("kmeans_starts", self.kmeans_starts, lo=1, integer=True)
        check_number("epochs", self.epochs, lo=0, integer=True)
        check_number("batch_size", self.batch_size, lo=1, integer=True)
        check_number("seed", self.seed, lo=0, hi=2**31 - 1, integer=True)
        if self.w_group_size is not None:
            check_number("w_group_size", self.w_group_size, lo=1, integer=True)

    @property
    def bits(self) -> str:
        return f"w{self.w_bits or 16}a{self.a_bits or 16}"

    @property
    def split(self) -> bool:
        return self.selector != "none"

    @property
    def trains(self) -> bool:
        """Whether anything is learned (rtn and smoothquant are closed-form)."""
        return self.epochs > 0 and (
            (self.transform and (self.learn_transform or self.learn_diag))
            or self.learn_clip
            or ((self.cws or self.mac) and self.learn_gates)
        )

    def replace(self, **kw: Any) -> "MethodConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                  hi_open: bool = False, integer: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number (an integer if ``integer``)
    in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``); the message names the flag and the range."""
    kind = "an integer" if integer else "a finite number"
    rng = ""
    if lo is not None and hi is not None:
        rng = f" in [{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f" >= {lo}"
    ok_type = (isinstance(value, (int, np.integer)) if integer
               else isinstance(value, (int, float, np.integer, np.floating)))
    ok = ok_type and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    if ok and lo is not None:
        ok = value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        raise ConfigError(f"{name} ({_flag(name)}) must be {kind}{rng}, got {value!r}")


# How a transform method rounds its main weights at the fold (methods/gptq/backend.py for "gptq").
WEIGHT_SOLVERS = ("rtn", "gptq")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")


def method_config(method: str, bits: str = "w4a4", **overrides: Any) -> MethodConfig:
    """The preset of ``method`` at ``bits``, with ``overrides`` applied.

    * ``rtn``: round-to-nearest, no transform, nothing learned.
    * ``smoothquant``: SmoothQuant channel scales (alpha 0.5) on the inputs a norm feeds (q/k/v
      and gate/up, as the reference implementation does), folded into those norms; nothing learned.
    * ``flatquant``: learned Kronecker transform + clipping; no split, no branches.
    * ``splitq``: FlatQuant + MOCD split + CWS + MAC (paper defaults; W3A2 uses larger ranks).
    """
    _one_of("method", method, METHODS)
    w, a = parse_bits(bits)
    base: dict[str, Any] = dict(method=method, w_bits=w, a_bits=a)
    if method in ("rtn", "smoothquant"):
        base.update(
            transform=method == "smoothquant", transform_groups="norm_fed", rotation_init="identity",
            diag_init="smooth",
            smooth_alpha=0.5, learn_transform=False, learn_diag=False, learn_clip=False,
            selector="none", cws=False, mac=False, epochs=0,
        )
    elif method == "flatquant":
        base.update(selector="none", cws=False, mac=False)
    elif method == "splitq" and (w, a) == (3, 2):
        base.update(cws_ratio=0.03, mac_ratio=0.05)
    base.update(overrides)
    return MethodConfig(**base)


# SplitQ's components added to FlatQuant one at a time (the paper's component ablation):
# variant name -> (preset, overrides). The first and last are the flatquant and splitq presets.
COMPONENT_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "flatquant": ("flatquant", {}),
    "flatquant+mocd": ("splitq", {"cws": False, "mac": False}),
    "flatquant+mocd+cws": ("splitq", {"mac": False}),
    "splitq": ("splitq", {}),
}


def variant_config(name: str, bits: str = "w4a4", **overrides: Any) -> MethodConfig:
    """A method preset (``METHODS``) or a component variant (``COMPONENT_VARIANTS``) at ``bits``."""
    if name in METHODS:
        return method_config(name, bits, **overrides)
    if name not in COMPONENT_VARIANTS:
        raise ConfigError(f"unknown method or variant {name!r}: choose one of "
                          f"{', '.join(dict.fromkeys(METHODS + tuple(COMPONENT_VARIANTS)))}")
    preset, fixed = COMPONENT_VARIANTS[name]
    return method_config(preset, bits, **{**fixed, **overrides})


def run_config(cfg: Any) -> Any:
    """What a whole-model run carries: the engine setting of a transform-engine method
    (:func:`as_engine`), any other method's own config as it is (GPTQ's, ...)."""
    if isinstance(cfg, MethodConfig) or hasattr(cfg, "engine_config"):
        return as_engine(cfg)
    if isinstance(getattr(cfg, "method", None), str):
        return cfg
    raise ConfigError(f"expected a method config (splitq_jax.methods.get_config), got {type(cfg).__name__}")


def as_engine(cfg: Any) -> MethodConfig:
    """The engine setting of ``cfg``: a :class:`MethodConfig` as it is, or a method's config
    (``splitq_jax.methods``) through its ``engine_config()``."""
    if isinstance(cfg, MethodConfig):
        return cfg
    if hasattr(cfg, "engine_config"):
        return cfg.engine_config()
    raise ConfigError(f"expected a method config (splitq_jax.methods.get_config) or a MethodConfig, got "
                      f"{type(cfg).__name__}")
