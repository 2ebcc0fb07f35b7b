"""The compressed-tensors ``pack-quantized`` format: what it can hold, its packing, its config.

This module knows the format and nothing about model names (:mod:`splitq_jax.interop.hf_export`
writes the directory). Facts used (compressed-tensors 0.20, ``compressors/pack_quantized``,
``quantization/quant_args.py``):

* A quantized ``Linear`` with weight ``(out, in)`` is stored as ``weight_packed`` int32
  ``(out, ceil(in*b/32))``, ``weight_scale`` ``(out, 1)`` per channel or ``(out, in/g)`` per group,
  ``weight_zero_point`` (asymmetric only) int32 packed the same way along dim 0,
  ``(ceil(out*b/32), n_groups)``, and ``weight_shape`` int64 ``(2,)``.
* Packing is *dense*: signed codes ``q`` in ``[-2^(b-1), 2^(b-1))`` are offset by ``+2^(b-1)``,
  and element ``i`` of each run of 32 takes bits ``[i*b, i*b+b)`` of ``b`` little-endian int32
  words; values may straddle words (3 bits). Rows are zero-padded to a multiple of 32 values.
* Dequantization is ``(q - zp) * scale`` with ``zp`` signed (0 when symmetric).

Ours (:class:`splitq_jax.packing.PackedTensor`) stores signed codes when symmetric and unsigned
codes ``[0, 2^b)`` with an unsigned integer zero point when asymmetric, so both sides dequantize to
the same numbers: symmetric codes are offset by ``+2^(b-1)`` before packing, asymmetric codes and
zero points are packed as they are (``q - 2^(b-1)`` and ``z - 2^(b-1)`` in the format's signed
convention, offset back by the packer).

Activations: the format's dynamic per-token int quantizer is symmetric with scale
``absmax / ((q_max - q_min) / 2)`` (int8: ``/127.5``, int4: ``/7.5``) over the full range
``[-2^(b-1), 2^(b-1))``; ours divides by ``q_max`` (``/127``, ``/7``). The weights of an export are
ours exactly; the activations a loader quantizes round on a grid 0.4 % (int8) or 7 % (int4) finer.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from splitq_jax.errors import SplitqError
from splitq_jax.packing import PackedTensor, unpack

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
WEIGHT_BITS = tuple(range(2, 9))  # what the packer takes (1-8) and loaders run (vLLM: 2-8)
ACT_BITS = (4, 8)  # input-activation widths some loader runs (vLLM WNA4Int / WNA8Int); 16 = none


class ExportError(SplitqError):
    """A checkpoint (or a setting) the compressed-tensors format cannot hold; the message says why."""


# ------------------------------------------------------------------------------------ packing


def pack_int32(codes: np.ndarray, bits: int) -> np.ndarray:
    """Dense little-endian packing of unsigned ``bits``-wide codes along the last axis.

    Args:
      codes: integers in ``[0, 2^bits)``, shape ``(rows, n)``.
    Returns:
      int32 words ``(rows, ceil(n * bits / 32))``: value ``i`` of a row sits in bits
      ``[i*bits, (i+1)*bits)`` of the row's bit stream, word ``k`` holding stream bits
      ``[32k, 32k+32)``.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_int32 takes a 2-D array, got shape {codes.shape}")
    if not 1 <= bits <= 8:
        raise ValueError(f"the format packs 1 to 8 bits, not {bits}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes outside [0, {1 << bits}) cannot be packed in {bits} bits")
    rows, n = codes.shape
    n_pad = -(-n // 32) * 32
    c = np.zeros((rows, n_pad), np.uint64)
    c[:, :n] = codes
    # Each run of 32 values is exactly `bits` words. A value starting at stream bit s lands in word
    # s // 32 at offset s % 32; its high part (when it straddles) goes into the next word.
    runs = c.reshape(rows, n_pad // 32, 32)
    start = np.arange(32, dtype=np.uint64) * np.uint64(bits)
    word, offset = start // np.uint64(32), start % np.uint64(32)
    out = np.zeros((rows, n_pad // 32, bits + 1), np.uint64)
    shifted = runs << offset  # < 2^40, no overflow in uint64
    for i in range(32):  # 32 scatters, each over all rows and runs at once
        out[:, :, word[i]] += shifted[:, :, i] & np.uint64(0xFFFFFFFF)
        out[:, :, word[i] + np.uint64(1)] += shifted[:, :, i] >> np.uint64(32)
    words = out[:, :, :bits].reshape(rows, -1)[:, : math.ceil(n * bits / 32)]
    return words.astype(np.uint32).view(np.int32)


def unpack_int32(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_int32`: ``(rows, n)`` unsigned codes (int32)."""
    w = np.asarray(words).view(np.uint32).astype(np.uint64)
    rows = w.shape[0]
    n_pad = -(-n // 32) * 32
    full = np.zeros((rows, n_pad * bits // 32 + 1), np.uint64)
    full[:, : w.shape[1]] = w
    start = np.arange(n, dtype=np.uint64) * np.uint64(bits)
    word, offset = start // np.uint64(32), start % np.uint64(32)
    both = full[:, word] | (full[:, word + np.uint64(1)] << np.uint64(32))
    return ((both >> offset) & np.uint64((1 << bits) - 1)).astype(np.int32)


def linear_tensors(w: PackedTensor) -> dict[str, np.ndarray]:
    """The format's tensors of one quantized ``Linear`` (names without the module prefix).

    ``w.shape`` is ``(out, in)`` (our stored orientation is the HF one). Scales stay float32 here.
    """
    if len(w.shape) != 2:
        raise ExportError(f"a linear weight must be 2-D, got shape {w.shape}")
    out_dim, in_dim = w.shape
    b = w.bits
    codes = np.asarray(unpack(w.qvalue, b, in_dim, w.word_dtype, signed=w.symmetric), np.int64)
    if w.symmetric:
        codes = codes + (1 << (b - 1))
    scale = np.asarray(w.scale, np.float32).reshape(out_dim, -1)
    tensors = {"weight_packed": pack_int32(codes, b), "weight_scale": scale,
               "weight_shape": np.asarray([out_dim, in_dim], np.int64)}
    if not w.symmetric:
        zp = np.asarray(w.zero_point, np.int64).reshape(out_dim, -1)
        tensors["weight_zero_point"] = np.ascontiguousarray(pack_int32(zp.T, b).T)
    return tensors


# ------------------------------------------------------------------------------------- config


def weight_args(bits: int, symmetric: bool, group_size: int | None) -> dict[str, Any]:
    """``QuantizationArgs`` of the stored weights (static: the scales are in the file)."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if group_size is None else "group", "group_size": group_size,
            "dynamic": False, "actorder": None}


def input_args(bits: int) -> dict[str, Any]:
    """``QuantizationArgs`` of dynamic per-token symmetric int input activations."""
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
            "dynamic": True}


def quantization_config(*, w_bits: int, w_symmetric: bool, group_size: int | None, a_bits: int | None,
                        ignore: tuple[str, ...]) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``: one config group targeting every
    ``Linear`` not in ``ignore``. Only keys the format defines (its pydantic models forbid extras)."""
    scheme = {"targets": ["Linear"], "weights": weight_args(w_bits, w_symmetric, group_size),
              "input_activations": None if a_bits is None else input_args(a_bits), "output_activations": None,
              "format": FORMAT}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": list(ignore), "kv_cache_scheme": None}


def check_settings(*, w_bits: int | None, a_bits: int | None, a_symmetric: bool, group_size: int | None) -> None:
    """Refuse bit settings no loader of the format runs (:class:`ExportError` with the reason)."""
    if w_bits is None:
        raise ExportError("the checkpoint's weights are not quantized (w16): the pack-quantized format holds "
                          "integer weights; export a checkpoint calibrated with 2- to 8-bit weights")
    if w_bits not in WEIGHT_BITS:
        raise ExportError(f"{w_bits}-bit weights: the format packs 2 to 8 bits")
    if a_bits is not None and a_bits not in ACT_BITS:
        raise ExportError(f"{a_bits}-bit activations: no loader of compressed-tensors checkpoints runs them "
                          f"(vLLM's integer schemes take 4- or 8-bit dynamic activations, or none); "
                          f"export a w{w_bits}a4, w{w_bits}a8 or w{w_bits}a16 checkpoint")
    if a_bits is not None and not a_symmetric:
        raise ExportError("asymmetric activations: the format's loaders quantize input activations "
                          "symmetrically per token; calibrate with symmetric activations")
    if a_bits == 8 and w_bits == 4 and group_size == 128:
        raise ExportError("int4 weights in groups of 128 with 8-bit activations: vLLM routes that checkpoint "
                          "to its fp8-activation kernel on Hopper GPUs (int8 semantics silently replaced); "
                          "calibrate W4A8 with per-channel weights (no --group-size) or another group size")


def validate(qconfig: Mapping[str, Any]) -> None:
    """Check ``qconfig`` with the format's own validator when it is installed (a no-op otherwise:
    the runtime does not need compressed-tensors)."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        return
    try:
        QuantizationConfig.model_validate(dict(qconfig))
    except Exception as e:  # pydantic.ValidationError; a bug in what we write, not user input
        raise AssertionError(f"compressed-tensors rejects the quantization_config we wrote: {e}") from e


__all__ = ["ACT_BITS", "ExportError", "FORMAT", "QUANT_METHOD", "WEIGHT_BITS", "check_settings", "input_args",
           "linear_tensors", "pack_int32", "quantization_config", "unpack_int32", "validate", "weight_args"]
