"""Checks made before a run spends minutes or gigabytes: refuse early, write nothing.

The main job (``scripts/calibrate.py``) runs these in order:

1. :func:`check_output`: ``--out`` can be created (probed by making and removing a directory in
   its nearest existing ancestor; ``os.access`` is not enough, since root passes it everywhere but
   a read-only or capability-restricted file system does not).
2. :func:`check_group_size` (the weight group size divides every width it applies to): from the
   config alone for the embedded and named models, before any weight is loaded; otherwise once the
   model is built. Then :func:`check_disk` (free space against the estimated checkpoint size).
3. after the samples are tokenized: :func:`check_memory` (the estimated peak memory of embedding
   and calibrating at that length against what this process may still allocate).

Every refusal is a :class:`PreflightError` whose message names the problem and the fix.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from splitq_jax.config import MethodConfig
from splitq_jax.errors import SplitqError

GB = 2**30


class PreflightError(SplitqError):
    """A run that cannot succeed, found before it started."""


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    p = Path(os.path.abspath(path))
    while not p.exists():
        p = p.parent
    return p


def check_output(out: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output directory that cannot be created; returns its nearest existing ancestor.

    Nothing is left behind: the probe directory is removed at once.
    """
    out = Path(out)
    base = nearest_existing(out.parent)
    if not base.is_dir():
        raise PreflightError(f"cannot create {out}: {base} is a file, not a directory; choose another {flag}")
    try:
        probe = tempfile.mkdtemp(prefix=".splitq-write-probe-", dir=base)
    except OSError as e:
        raise PreflightError(f"cannot write the output {out}: {base} is not writable ({e.strerror}); "
                             f"choose a {flag} in a directory you can write") from None
    os.rmdir(probe)
    return base


def nbytes(leaves: Iterable[Any]) -> int:
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves if hasattr(a, "shape")))


def block_weight_bytes(block_params: dict[str, Any], groups: dict[str, tuple[str, ...]], bits: int | None) -> int:
    """Estimated stored size of one quantized block: packed weights at ``max(bits, 4)`` (outlier
    groups and branches never go below 4 bits), rounded up by a quarter for scales, transforms and
    branches; float32 when ``bits`` is None."""
    n = sum(int(np.prod(block_params[name]["w"].shape)) for names in groups.values() for name in names)
    per_weight = 4.0 if bits is None else max(bits, 4) / 8
    return int(n * per_weight * 1.25)


def check_disk(out: str | os.PathLike, need_bytes: int) -> None:
    """Refuse when the file system of ``out`` has less free space than ``need_bytes``."""
    base = nearest_existing(Path(out).parent)
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise PreflightError(f"not enough disk space for {out}: the run needs about {need_bytes / GB:.2f} GB "
                             f"(finished blocks plus the checkpoint) and {base} has {free / GB:.2f} GB free; "
                             "free some space or choose another --out")


def group_widths(block_params: dict[str, Any], groups: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Input width of each group (the ``d`` of its weights ``(d_out, d)``)."""
    return {g: int(block_params[names[0]]["w"].shape[1]) for g, names in groups.items()}


def main_widths(widths: dict[str, int], cfg: MethodConfig) -> dict[str, int]:
    """Width of each group's main weight: the full width on the masked path, the width less the
    outlier channels on the gathered path of a split group."""
    from splitq_jax.calibrate import group_is_split
    from splitq_jax.methods.splitq.mocd import channel_counts

    out = {}
    for g, d in widths.items():
        if getattr(cfg, "main_path", "masked") == "gathered" and group_is_split(g, cfg):
            k_t, k_v = channel_counts(d, cfg.text_ratio, cfg.vision_ratio)
            d -= k_t + k_v
        out[g] = d
    return out


def check_group_size(block_params: dict[str, Any], groups: dict[str, tuple[str, ...]], cfg: MethodConfig,
                     part: str = "language") -> None:
    """Refuse a ``w_group_size`` that does not divide every main-weight width of the block."""
    check_group_size_widths(group_widths(block_params, groups), cfg, part)


def decoder_widths(text_cfg) -> dict[str, int]:
    """Group input widths of a decoder block from its config alone (no weights needed)."""
    from splitq_jax.block import BlockConfig

    b = BlockConfig.from_decoder(text_cfg)
    return {"attn_in": b.hidden, "attn_out": b.num_heads * b.head_dim, "mlp_in": b.hidden, "mlp_out": b.intermediate}


def check_group_size_widths(widths: dict[str, int], cfg: MethodConfig, part: str = "language") -> None:
    """:func:`check_group_size` on group input widths ``{group: d}``."""
    g_size = cfg.w_group_size
    if g_size is None or cfg.w_bits is None:
        return
    widths = main_widths(widths, cfg)
    bad = {g: d for g, d in widths.items() if d % g_size}
    if bad:
        listing = ", ".join(f"{g} {d}" for g, d in bad.items())
        divisors = sorted(set.intersection(*({k for k in range(1, d + 1) if d % k == 0} for d in widths.values())))
        raise PreflightError(f"--w-group-size {g_size} does not divide the {part} weight widths ({listing}); "
                             f"use a common divisor ({', '.join(map(str, divisors[-6:]))}) or none")


# ------------------------------------------------------------------------------------- memory


def _read_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """Bytes this process may still allocate: the smaller of the system's available memory and
    what the address-space limit (``RLIMIT_AS``, e.g. ``ulimit -v``) leaves; None if unknown."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    vm = _read_status("VmSize")
    if soft != resource.RLIM_INFINITY and vm is not None:
        limits.append(soft - vm)
    return min(limits) if limits else None


def run_memory(*, samples: int, tokens: int, hidden: int, intermediate: int, num_heads: int, head_dim: int,
               batch_size: int, quantized_inputs: bool = False) -> int:
    """Estimated peak bytes that calibrating one decoder block adds at ``tokens`` per sample.

    Counted (float32): the block streams ``(S, N, d)`` (inputs, targets, quantized inputs) with the
    ``(S, N, N)`` mask and rotary tables; the pooled group inputs of the statistics pass
    ``S * N * (3d + I)`` (twice, while concatenated); one training step's activations and their
    gradients at ``batch_size``: attention scores ``B * H * N^2`` a handful of times and the MLP's
    ``B * N * I`` likewise. A factor 1.5 covers XLA's temporaries. An estimate for refusing runs
    that cannot fit, not an accounting.
    """
    s, n, d, i = samples, tokens, hidden, intermediate
    b = min(batch_size, samples)
    streams = s * n * d * 4 * (3 if quantized_inputs else 2) + s * n * n + 2 * s * n * head_dim * 4
    pooled = 2 * s * n * (3 * d + i) * 4
    step = b * num_heads * n * n * 4 * 6 + b * n * i * 4 * 8 + b * n * d * 4 * 12
    return int(1.5 * (streams + pooled + step))


def check_memory(need_bytes: int, what: str, fix: str, available: int | None = None) -> None:
    """Refuse when ``need_bytes`` exceeds :func:`available_memory` (no check when it is unknown)."""
    have = available_memory() if available is None else available
    if have is not None and need_bytes > have:
        raise PreflightError(f"{what} needs about {need_bytes / GB:.1f} GB of memory but only "
                             f"{max(have, 0) / GB:.1f} GB is available; {fix}")
