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

Today every method runs on the one calibration engine of :mod:`splitq_jax.calibrate`, which reads
an engine setting (:class:`~splitq_jax.config.MethodConfig`, built by ``Config.engine_config()``);
the per-method logic moves behind :class:`Method` step by step (issue 12).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from splitq_jax.config import MethodConfig, method_config, parse_bits

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
        self.engine_config()  # validates every field (messages name the flags)

    @property
    def bits(self) -> str:
        return f"w{self.w_bits or 16}a{self.a_bits or 16}"

    def engine_config(self) -> MethodConfig:
        """The engine setting that runs this method (:func:`splitq_jax.config.method_config`)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

    def _engine(self, preset: str, **extra: Any) -> MethodConfig:
        """The engine preset ``preset`` at this config's bit widths with every field applied."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        w, a = fields.pop("w_bits"), fields.pop("a_bits")
        cfg = method_config(preset, "w4a4", **fields, **extra)
        return cfg.replace(w_bits=w, a_bits=a)


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its ``Config`` class and the presets of named variants
    (``flatquant+mocd`` = ``splitq`` without CWS and MAC)."""

    name: str
    config_class: type[QuantSpec]
    summary: str
    bit_defaults: dict[tuple[int | None, int | None], dict[str, Any]] = dataclasses.field(default_factory=dict)

    def config(self, bits: str = "w4a4", **options: Any) -> QuantSpec:
        """This method's config at ``bits`` (``"w4a4"``), with bit-dependent defaults (e.g.
        SplitQ's larger ranks at W3A2) and then ``options`` applied (names must be this method's:
        :func:`splitq_jax.methods.get_config` explains a foreign one)."""
        w, a = parse_bits(bits)
        return self.config_class(**{"w_bits": w, "a_bits": a, **self.bit_defaults.get((w, a), {}), **options})


def option_names(config_class: type[QuantSpec]) -> tuple[str, ...]:
    """Every field a user sets by name (``bits`` covers w_bits and a_bits)."""
    return tuple(f.name for f in dataclasses.fields(config_class) if f.name not in ("w_bits", "a_bits"))
