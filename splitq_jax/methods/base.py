"""The method seam: what every quantization method shares, and the registry.

A method is a module of :mod:`splitq_jax.methods` with

* a frozen, keyword-only ``Config`` class holding the shared :class:`QuantSpec` fields (bit widths,
  symmetry, weight group size, seed) plus only that method's own knobs, validated on
  construction (a bad value is a :class:`~splitq_jax.config.ConfigError` naming its flag);
* a :class:`Method` object registered under its name (CLI ``--method``, manifest ``method``).

Every field of a method's ``Config`` is a command-line flag of the same name (``--smooth-alpha``)
and a key of a ``--config`` JSON file; ``scripts/calibrate.py --method NAME --help`` lists exactly
that method's fields. Bit widths are given together as ``bits`` (``"w4a4"``).

Today every method runs on the one calibration engine of :mod:`splitq_jax.calibrate`, which reads
an engine setting (:class:`~splitq_jax.config.MethodConfig`, built by ``Config.engine_config()``);
the per-method logic moves behind :class:`Method` step by step (issue 12).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from splitq_jax.config import ConfigError, MethodConfig, method_config, parse_bits

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
        SplitQ's larger ranks at W3A2) and then ``options`` applied. Unknown options are an error
        naming this method's valid ones."""
        unknown = sorted(set(options) - set(option_names(self.config_class)) - {"w_bits", "a_bits"})
        if unknown:
            owners = {o: [m for m, meth in METHODS.items() if o in option_names(meth.config_class)] for o in unknown}
            where = "; ".join(f"{o} belongs to {', '.join(owners[o])}" if owners[o] else f"{o} is no option"
                              for o in unknown)
            raise ConfigError(f"{', '.join(unknown)}: not an option of {self.name} ({where}); {self.name}'s "
                              f"options: bits, {', '.join(option_names(self.config_class))}")
        w, a = parse_bits(bits)
        return self.config_class(**{"w_bits": w, "a_bits": a, **self.bit_defaults.get((w, a), {}), **options})


METHODS: dict[str, Method] = {}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}


def register(method: Method, variants: dict[str, dict[str, Any]] | None = None) -> Method:
    """Add ``method`` (and named variants of it) to the registry."""
    METHODS[method.name] = method
    for name, fixed in (variants or {}).items():
        VARIANTS[name] = (method.name, fixed)
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; a variant name gives its method (see :func:`get_config`)."""
    from splitq_jax import methods  # noqa: F401  (registers the built-in methods)

    if name in METHODS:
        return METHODS[name]
    if name in VARIANTS:
        return METHODS[VARIANTS[name][0]]
    raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(names())}")


def names() -> tuple[str, ...]:
    """Every method and variant name, methods first."""
    from splitq_jax import methods  # noqa: F401

    return tuple(METHODS) + tuple(v for v in VARIANTS if v not in METHODS)


def get_config(name: str, bits: str = "w4a4", **options: Any) -> QuantSpec:
    """The config of method or variant ``name`` at ``bits`` with ``options`` applied."""
    method = get_method(name)
    fixed = VARIANTS[name][1] if name in VARIANTS and name not in METHODS else {}
    return method.config(bits, **{**fixed, **options})


def option_names(config_class: type[QuantSpec]) -> tuple[str, ...]:
    """Every field a user sets by name (``bits`` covers w_bits and a_bits)."""
    return tuple(f.name for f in dataclasses.fields(config_class) if f.name not in ("w_bits", "a_bits"))


# ---------------------------------------------------------------------------------- command line


def add_method_flags(parser: argparse.ArgumentParser, method: Method) -> None:
    """``--method``, ``--bits`` and one flag per field of ``method``'s config (defaults None, so
    only what the user typed overrides the preset and the ``--config`` file)."""
    parser.add_argument("--method", default=None, choices=names(),
                        help=f"quantization method or variant (default splitq): {', '.join(names())}")
    parser.add_argument("--bits", default=None, help="bit widths wXaY, e.g. w4a8, w4a4, w3a3, w3a2 (default w4a4)")
    group = parser.add_argument_group(f"{method.name} options ({method.summary})")
    defaults = method.config()
    for f in dataclasses.fields(method.config_class):
        if f.name in ("w_bits", "a_bits"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                               help=f"(default: {default})")
        else:
            kind = {int: int, float: float, str: str}.get(type(default), _int_or_none)
            group.add_argument(flag, dest=f.name, default=None, type=kind, help=f"(default: {default})")


def _int_or_none(s: str) -> int | None:
    return None if s.lower() in ("none", "null", "") else int(s)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON object of options (``method``, ``bits`` and config fields), not yet validated."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a JSON object of option names to values")
    return data


def method_name_from(argv: list[str], file_options: dict[str, Any] | None) -> str:
    """The method a command line asks for: ``--method`` wins over the ``--config`` file's
    ``method``; the default is ``splitq``. Unknown names are an error listing the valid ones."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(argv)
    name = known.method or (file_options or {}).get("method") or "splitq"
    if not isinstance(name, str):
        raise ConfigError(f"method must be a name, got {name!r}; choose one of {', '.join(names())}")
    get_method(name)
    return name


def config_from_args(args: argparse.Namespace, file_options: dict[str, Any] | None = None) -> QuantSpec:
    """Preset of (method, bits) <- ``--config`` file options <- flags typed on the command line."""
    opts = dict(file_options or {})
    name = args.method or opts.pop("method", None) or "splitq"
    opts.pop("method", None)
    bits = args.bits or opts.pop("bits", None) or "w4a4"
    opts.pop("bits", None)
    for k in ("w_bits", "a_bits"):
        if k in opts:
            raise ConfigError(f"set bit widths with 'bits' (e.g. \"w4a4\"), not {k!r}")
    method = get_method(name)
    for f in dataclasses.fields(method.config_class):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("w_bits", "a_bits"):
            opts[f.name] = v
    return get_config(name, bits, **opts)
