"""The method seam: what every quantization method shares, and the registry.

A method is a module of :mod:`splitq_jax.methods` with

* a frozen, keyword-only ``Config`` class holding the shared :class:`QuantSpec` fields (bit widths,
  symmetry, weight group size, seed) plus only that method's own knobs, validated on
  construction (a bad value is a :class:`~splitq_jax.config.ConfigError` naming its flag);
* a :class:`Method` object, ``METHOD``, listed in :mod:`splitq_jax.methods.registry` under its
  name (CLI ``--method``, manifest ``method``).

Every field of a method's ``Config`` is a command-line flag of the same name (``--smooth-alpha``)
and a key of a ``--config`` JSON file; ``scripts/calibrate.py --method NAME --help`` lists exactly
that method's fields. Bit widths are given together as ``bits`` (``"w4a4"``).

The pipeline calls a method only through :class:`Method`'s two steps (calibrate a block, fold
it). RTN, SmoothQuant, FlatQuant and SplitQ share one implementation of them, the transform engine
(:mod:`splitq_jax.methods.transform`), which reads an engine setting
(:class:`~splitq_jax.config.MethodConfig`, built by ``Config.engine_config()``). A method that is
no transform (GPTQ's column updates, AWQ's search) subclasses :class:`Method` instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from splitq_jax.config import ConfigError, check_number, parse_bits
from splitq_jax.quantized.schema import InferenceSpec
from splitq_jax.quant import check_bits

# Fields every method shares: set from ``bits`` (w_bits, a_bits) or flags of their own.
SHARED_FIELDS = ("w_bits", "a_bits", "w_symmetric", "a_symmetric", "w_group_size", "seed")


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """The quantization every method shares: bit widths (None: that quantizer is off), symmetry,
    the weight group size (None: one scale per output channel) and the seed of any randomness
    (data order, random rotations)."""

    w_bits: int | None = 4
    a_bits: int | None = 4
    w_symmetric: bool = True
    a_symmetric: bool = True
    w_group_size: int | None = None
    seed: int = 0

    # Set by each method's Config: its registry name.
    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_bits(self.w_bits)
        check_bits(self.a_bits)
        for name in ("w_symmetric", "a_symmetric"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be true or false, "
                                  f"got {getattr(self, name)!r}")
        check_number("seed", self.seed, lo=0, hi=2**31 - 1, integer=True)
        if self.w_group_size is not None:
            check_number("w_group_size", self.w_group_size, lo=1, integer=True)
        self.validate()

    def validate(self) -> None:
        """The method's own checks of its fields (a :class:`ConfigError` naming the flag)."""

    @property
    def bits(self) -> str:
        return f"w{self.w_bits or 16}a{self.a_bits or 16}"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> "QuantSpec":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its ``Config`` class, bit-dependent defaults, and the two
    steps every method performs on one block, which the whole-model pipeline calls in turn:

    * :meth:`calibrate_block` ``(block_params, data, cfg, bcfg, *, key, on_step) -> CalibResult``:
      whatever the method does with the block and its calibration data (statistics it collects
      with :mod:`splitq_jax.calib`, closed-form scales, training, searches, column updates).
      The result carries the method's own state (``qparams``, ``qconsts``) and, for the report,
      the block loss before and after and the per-group statistics.
    * :meth:`fold_block` ``(result, cfg, bcfg) -> folded block``: the stored, method-agnostic
      format (packed weights, online transforms, norms; see :mod:`splitq_jax.quantized.fold`) that the
      runtime executes from :meth:`inference_spec` alone.

    Subclasses implement the two steps; :class:`splitq_jax.methods.transform.TransformMethod`
    is the learned / closed-form transform engine that RTN, SmoothQuant, FlatQuant and SplitQ
    share."""

    name: str
    config_class: type[QuantSpec]
    summary: str
    bit_defaults: dict[tuple[int | None, int | None], dict[str, Any]] = dataclasses.field(default_factory=dict)
    # The bit widths a config gets when none are given (AWQ and MBQ are weight-only by default).
    default_bits: str = "w4a4"

    def calibrate_block(self, block_params: Any, data: Any, cfg: Any, bcfg: Any, *, key: Any = None,
                        on_step: Any = None) -> Any:
        raise NotImplementedError(f"method {self.name} does not implement calibrate_block")

    def fold_block(self, result: Any, cfg: Any, bcfg: Any = None) -> Any:
        raise NotImplementedError(f"method {self.name} does not implement fold_block")

    def model_pass(self, model: Any, stream: Any, cfg: Any, *, work_dir: Any = None, resume: bool = False,
                   on_sample: Any = None) -> "ModelPass | None":
        """A whole-model pass before block 0 whose per-block results reach :meth:`calibrate_block`
        as ``context`` (MBQ's gradient pass); saved in ``work_dir`` and reused on ``resume``.
        ``on_sample(done, total)`` reports progress. Most methods have none (None)."""
        return None

    def inference_spec(self, cfg: Any) -> InferenceSpec:
        """What the runtime needs of ``cfg`` (bit widths, symmetry, main path, text tokens)."""
        return InferenceSpec.of(cfg)

    def config(self, bits: str | None = None, **options: Any) -> QuantSpec:
        """This method's config at ``bits`` (``"w4a4"``; None: :attr:`default_bits`), with bit-dependent defaults (e.g.
        SplitQ's larger ranks at W3A2) and then ``options`` applied (names must be this method's:
        :func:`splitq_jax.methods.get_config` explains a foreign one)."""
        w, a = parse_bits(bits or self.default_bits)
        return self.config_class(**{"w_bits": w, "a_bits": a, **self.bit_defaults.get((w, a), {}), **options})


@dataclass(frozen=True)
class ModelPass:
    """What :meth:`Method.model_pass` found: ``contexts[i]`` for language block ``i`` and a
    JSON-able ``record`` for the manifest (e.g. MBQ's layer ratios and any data fallback)."""

    contexts: list[Any]
    record: dict[str, Any]


def option_names(config_class: type[QuantSpec]) -> tuple[str, ...]:
    """Every field a user sets by name (``bits`` covers w_bits and a_bits)."""
    return tuple(f.name for f in dataclasses.fields(config_class) if f.name not in ("w_bits", "a_bits"))
