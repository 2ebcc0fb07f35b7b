"""The registry of methods and named variants, and the command-line and config-file front end.

Every method module exports ``METHOD`` (a :class:`~splitq_jax.methods.base.Method`); this module
lists them, in the order they are offered (simplest first). Nothing below it imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from splitq_jax.block import GROUP_NORM
from splitq_jax.config import ConfigError
from splitq_jax.methods import flatquant, rtn, smoothquant
from splitq_jax.methods.awq import mbq
from splitq_jax.methods.awq import method as awq
from splitq_jax.methods.gptq import method as gptq
from splitq_jax.methods.gptq import tlq
from splitq_jax.methods.splitq import method as splitq
from splitq_jax.methods.base import Method, QuantSpec, option_names
from splitq_jax.quantized.fold import canonicalize

METHODS: dict[str, Method] = {m.name: m for m in (rtn.METHOD, smoothquant.METHOD, flatquant.METHOD, splitq.METHOD,
                                                  gptq.GPTQ, gptq.GPTAQ, gptq.VLM_PTQ, awq.AWQ,
                                                  mbq.MBQ, tlq.TLQ)}
# Named presets of a method: variant -> (method, fixed options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {name: ("splitq", fixed) for name, fixed in splitq.VARIANTS.items()}


def names() -> tuple[str, ...]:
    """Every method and variant name, methods first."""
    return tuple(METHODS) + tuple(VARIANTS)


def get_method(name: str) -> Method:
    """The method ``name``; a variant name gives its method (see :func:`get_config`)."""
    if name in METHODS:
        return METHODS[name]
    if name in VARIANTS:
        return METHODS[VARIANTS[name][0]]
    raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(names())}")


def method_of(cfg: Any) -> Method:
    """The method that runs ``cfg``: a method's config or an engine setting (both name it)."""
    name = getattr(cfg, "method", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"expected a method config (splitq_jax.get_config), got {type(cfg).__name__}")
    return get_method(name)


def calibrate_block(block_params: Any, data: Any, cfg: Any, bcfg: Any, *, key: Any = None, on_step: Any = None,
                    context: Any = None):
    """Calibrate one block with ``cfg``'s method (:meth:`Method.calibrate_block`).

    Args:
      block_params: the block's weights (``splitq_jax.block`` layout); data: its
        :class:`~splitq_jax.calibrate.BlockData` (inputs ``(S, N, d)``, FP targets, rotary tables,
        mask, modality, optional per-token weights); cfg: a method config (:func:`get_config`)
        or an engine setting; bcfg: the block's :class:`~splitq_jax.block.BlockConfig`;
      key: PRNG key (default ``PRNGKey(cfg.seed)``); on_step: ``(step, loss)`` after each step;
      context: what the method's whole-model pass found for this block (MBQ, TLQ), if any.
    Returns:
      A :class:`~splitq_jax.calibrate.CalibResult` for :func:`fold_block`.
    """
    extra = {} if context is None else {"context": context}
    return method_of(cfg).calibrate_block(block_params, data, cfg, bcfg, key=key, on_step=on_step, **extra)


def fold_block(result: Any, cfg: Any, bcfg: Any = None):
    """The stored (packed, method-agnostic, canonical) form of a calibrated block:
    :meth:`Method.fold_block`, then :func:`splitq_jax.quantized.fold.canonicalize`."""
    method = method_of(cfg)
    group_norm = GROUP_NORM if bcfg is None else bcfg.group_norm
    return canonicalize(method.fold_block(result, cfg, bcfg), group_norm, method.inference_spec(cfg).main_path)


def option_owners(option: str) -> list[str]:
    """The methods that have ``option`` (a field name, ``lr``)."""
    return [m for m, meth in METHODS.items() if option in option_names(meth.config_class)]


def get_config(name: str, bits: str | None = None, **options: Any) -> QuantSpec:
    """The config of method or variant ``name`` at ``bits`` (None: the method's default, w4a4 or
    w4a16 for the weight-only-first methods) with ``options`` applied; an option
    of another method is an error naming the methods it belongs to and this one's options."""
    method = get_method(name)
    allowed = set(option_names(method.config_class))
    unknown = sorted(set(options) - allowed - {"w_bits", "a_bits"})
    if unknown:
        where = "; ".join(f"{o} belongs to {', '.join(option_owners(o))}" if option_owners(o) else f"{o} is no option"
                          for o in unknown)
        raise ConfigError(f"{', '.join(unknown)}: not an option of {name} ({where}); {name}'s options: "
                          f"bits, {', '.join(option_names(method.config_class))}")
    fixed = VARIANTS[name][1] if name in VARIANTS else {}
    return method.config(bits, **{**fixed, **options})


# ---------------------------------------------------------------------------------- command line


def add_method_flags(parser: argparse.ArgumentParser, method: Method) -> None:
    """``--method``, ``--bits`` and one flag per field of ``method``'s config (defaults None, so
    only what the user typed overrides the preset and the ``--config`` file)."""
    parser.add_argument("--method", default=None, choices=names(),
                        help=f"quantization method or variant (default splitq): {', '.join(names())}")
    parser.add_argument("--bits", default=None, help="bit widths wXaY, e.g. w4a8, w4a4, w3a3, w3a2 (default: the "
                        "method's: w4a4; w4a16 for awq; w3a16 for mbq and tlq)")
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
    bits = args.bits or opts.pop("bits", None) or get_method(name).default_bits
    opts.pop("bits", None)
    for k in ("w_bits", "a_bits"):
        if k in opts:
            raise ConfigError(f"set bit widths with 'bits' (e.g. \"w4a4\"), not {k!r}")
    for f in dataclasses.fields(get_method(name).config_class):
        v = getattr(args, f.name, None)
        if v is not None and f.name not in ("w_bits", "a_bits"):
            opts[f.name] = v
    return get_config(name, bits, **opts)
