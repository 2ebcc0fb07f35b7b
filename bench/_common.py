"""Shared helpers of the benchmarks: machine name, run record, atomic JSON output, block shapes and
the heterogeneous synthetic vision-language block inputs.

Every benchmark writes ONE JSON file ``bench/results/<bench>-<machine>.json``: a list of flat
records (``bench``, ``model``, ``method``, ``bits``, ``metric``, ``value``, ``machine`` + recipe
fields) and one ``metric == "run"`` record with the command line and package versions.
"""

from __future__ import annotations

import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from splitq_jax.fsutil import write_json  # noqa: E402

RESULTS = REPO / "bench" / "results"

# Block shapes (the language-model decoder block of each model).
QWEN2_05B = dict(hidden=896, intermediate=4864, num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True)
QWEN25_VL_3B = dict(hidden=2048, intermediate=11008, num_heads=16, num_kv_heads=2, head_dim=128, qkv_bias=True)

PAD, TEXT, VISION = 0, 1, 2


def machine_name() -> str:
    """``cpu-<n>core`` or ``<gpu kind>`` (e.g. ``gpu-h100``), used in file names and records."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    kind = getattr(dev, "device_kind", dev.platform).lower()
    for tag in ("h100", "h200", "a100", "l4", "v100"):
        if tag in kind:
            return f"gpu-{tag}"
    return f"{dev.platform}-" + "".join(ch if ch.isalnum() else "-" for ch in kind)


def versions() -> dict[str, str]:
    import flax
    import jax
    import jaxlib
    import optax

    return {
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version(),
    }


def run_record(bench: str, machine: str, **extra: Any) -> dict[str, Any]:
    """The one record per file that says how the numbers were produced."""
    import jax

    rec = {
        "bench": bench, "metric": "run", "machine": machine,
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rec.update(versions())
    rec.update(extra)
    return rec


def write_json_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    """Write ``records`` to ``path`` via a temp file in the same folder and a rename."""
    write_json(path, records, default=_jsonable)


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark of this process's RSS (``VmHWM``; Linux's
    ``clear_refs`` value 5), so that :func:`window_peak_rss_bytes` measures from now. False where
    the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window_peak_rss_bytes() -> int | None:
    """``VmHWM``: the peak RSS since :func:`reset_peak_rss` (else since the start); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first device, when the backend reports it (GPU/TPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may raise or return None
        return None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


def block_params(bcfg, seed: int = 0):
    """Random block weights with a realistic scale: ``N(0, 1/fan_in)`` for every linear (the
    library's ``init_block_params`` takes one scale, so down_proj, whose fan-in is the intermediate
    size, is rescaled afterwards)."""
    import jax

    from splitq_jax.block import init_block_params

    p = init_block_params(jax.random.PRNGKey(seed), bcfg, scale=1.0 / np.sqrt(bcfg.hidden))
    o_fan_in = bcfg.num_heads * bcfg.head_dim
    p["o_proj"]["w"] = p["o_proj"]["w"] * np.float32(np.sqrt(bcfg.hidden / o_fan_in))
    p["down_proj"]["w"] = p["down_proj"]["w"] * np.float32(np.sqrt(bcfg.hidden / bcfg.intermediate))
    return p


# ---------------------------------------------------------------------------------------------
# Heterogeneous synthetic vision-language block inputs


def outlier_channels(hidden: int, n_vision: int, n_text_massive: int, n_text_unstable: int,
                     seed: int = 1234) -> dict[str, np.ndarray]:
    """Fixed, disjoint channel sets of the generator (the 'model' property, shared by every sample)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(hidden)
    a, b = n_vision, n_vision + n_text_massive
    c = b + n_text_unstable
    return {"vision": np.sort(perm[:a]), "text_massive": np.sort(perm[a:b]),
            "text_unstable": np.sort(perm[b:c])}


def synthetic_vl_inputs(n_samples: int, n_tokens: int, hidden: int, *, seed: int,
                        vision_frac: tuple[float, float] = (0.4, 0.6),
                        n_vision_outliers: int | None = None,
                        n_text_massive: int = 2,
                        n_text_unstable: int | None = None,
                        channel_seed: int = 1234) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Block inputs (residual stream) of a vision-language model, synthetically.

    Layout of each sample (no padding): a short text prefix (system prompt, 4-16 tokens), one
    contiguous span of vision tokens (a fraction ``vision_frac`` of the sequence, drawn per
    sample), then text (the question / answer).

    Values of token ``i``, channel ``j`` (background standard deviation ~1):

    * background, all tokens: Student-t (4 dof: heavy tails, finite variance) times a fixed
      per-channel scale ``exp(N(0, 0.8))`` (channel magnitudes differ widely, as in real hidden
      states, so a normal channel keeps a fairly stable rank among channels); vision tokens use a
      *different* per-channel scale draw, 1.5x larger overall (vision and text hidden states are
      distributed differently);
    * vision-outlier channels (``n_vision_outliers``, default ~1% of d): on vision tokens only,
      a fixed sign per channel times a fixed per-channel magnitude ``U(40, 100)``, jittered
      ``x U(0.7, 1.3)`` per token, present on a random 70% of the vision tokens (image patches
      differ); plain background on text tokens;
    * text massive channels (``n_text_massive``, default 2): on text tokens only, a fixed sign and
      a nearly constant magnitude ``60 x U(0.95, 1.05)``: "massive activations", large and
      consistent (a stable rank, so MOCD's instability score should *not* pick them);
    * text unstable channels (``n_text_unstable``, default ~1% of d), on text tokens only, whose
      relative magnitude (rank among channels) jumps from token to token — what MOCD's
      instability score (Eq. 9-11) is meant to find. Two kinds, half each:
      "log-normal" ones, ``|N(0,1)| * exp(N(log 3, 1.5))`` with a random sign (a magnitude that
      spans orders of magnitude token to token, so the rank is spread over [0, 1]), and "spiky"
      ones that fire with probability 0.25 at ``U(8, 30)`` with a random sign and otherwise stay
      background (a bimodal rank: note that Eq. 10's within-cluster variance with K=3 separates
      the two modes and scores these barely above normal channels, while K=1 finds them);
    * the first token (an attention sink) carries 600 (10x the massive value) on the massive
      channels.

    The channel sets and per-channel properties depend only on ``channel_seed`` (they are a
    property of "the model"); ``seed`` draws the samples, so held-out data uses another ``seed``.
    Only the block *input* is synthetic: the inputs of o_proj and down_proj are produced by the
    block itself (random weights), so their outliers are whatever attention and SwiGLU make.

    Returns:
      ``x: (S, N, d) float32``, ``modality: (S, N) int32`` (1 text, 2 vision), and the channel
      sets ``{"vision", "text_massive", "text_unstable"}``.
    """
    n_vis = n_vision_outliers if n_vision_outliers is not None else max(2, round(0.01 * hidden))
    n_uns = n_text_unstable if n_text_unstable is not None else max(2, round(0.01 * hidden))
    ch = outlier_channels(hidden, n_vis, n_text_massive, n_uns, seed=channel_seed)
    crng = np.random.default_rng(channel_seed + 1)  # fixed per-channel properties
    dof = 4.0
    bg_std = np.sqrt(dof / (dof - 2.0))
    text_scale = (np.exp(crng.normal(0.0, 0.8, hidden)) / bg_std).astype(np.float32)
    vis_scale = (1.5 * np.exp(crng.normal(0.0, 0.8, hidden)) / bg_std).astype(np.float32)
    vis_amp = crng.choice([-1.0, 1.0], ch["vision"].size) * crng.uniform(40.0, 100.0, ch["vision"].size)
    mass_sign = crng.choice([-1.0, 1.0], ch["text_massive"].size)

    rng = np.random.default_rng(seed)  # per-sample randomness
    x = np.empty((n_samples, n_tokens, hidden), np.float32)
    modality = np.full((n_samples, n_tokens), TEXT, np.int32)
    for s in range(n_samples):
        prefix = int(rng.integers(4, 17))
        n_v = int(round(rng.uniform(*vision_frac) * n_tokens))
        n_v = max(1, min(n_v, n_tokens - prefix - 1))
        modality[s, prefix:prefix + n_v] = VISION
        is_v = modality[s] == VISION
        it = ~is_v
        n_t = int(it.sum())
        bg = rng.standard_t(dof, size=(n_tokens, hidden)).astype(np.float32)
        xs = bg * np.where(is_v[:, None], vis_scale[None, :], text_scale[None, :])
        # vision-outlier channels, vision tokens only
        fire = rng.random((n_v, ch["vision"].size)) < 0.7
        amp = vis_amp * rng.uniform(0.7, 1.3, (n_v, ch["vision"].size))
        xs[np.ix_(is_v, ch["vision"])] += (fire * amp).astype(np.float32)
        # text massive channels, text tokens only
        xs[np.ix_(it, ch["text_massive"])] = (
            mass_sign * 60.0 * rng.uniform(0.95, 1.05, (n_t, ch["text_massive"].size))
        ).astype(np.float32)
        # text unstable channels, text tokens only
        n_u = ch["text_unstable"].size
        n_logn = (n_u + 1) // 2  # the first half are log-normal, the rest spiky
        logn = np.abs(rng.standard_normal((n_t, n_logn))) * np.exp(rng.normal(np.log(3.0), 1.5, (n_t, n_logn)))
        fire = rng.random((n_t, n_u - n_logn)) < 0.25
        spike = rng.uniform(8.0, 30.0, fire.shape)
        cur = xs[np.ix_(it, ch["text_unstable"][n_logn:])]
        sign = rng.choice([-1.0, 1.0], (n_t, n_u))
        vals = np.concatenate([logn * sign[:, :n_logn], np.where(fire, spike * sign[:, n_logn:], cur)], axis=1)
        xs[np.ix_(it, ch["text_unstable"])] = vals.astype(np.float32)
        xs[0, ch["text_massive"]] = (mass_sign * 600.0).astype(np.float32)
        x[s] = xs
    return x, modality, ch


def rope_and_mask(n_samples: int, n_tokens: int, head_dim: int):
    """1-D rotary tables and causal masks for unpadded sequences."""
    import jax.numpy as jnp

    from splitq_jax.block import causal_mask, rope_1d

    pos = jnp.broadcast_to(jnp.arange(n_tokens, dtype=jnp.int32), (n_samples, n_tokens))
    cos, sin = rope_1d(pos, head_dim)
    mask = causal_mask(jnp.ones((n_samples, n_tokens), bool))
    return cos, sin, mask


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.t0
