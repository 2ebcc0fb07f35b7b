"""MOCD: modality-specific outlier channel decoupling (spec section 4.2, Eq. 7-12).

Given the raw inputs of a linear layer over calibration tokens, split its input channels into three
disjoint groups, named as everywhere else in the project:

* ``vision``: the ``k_v`` channels with the largest magnitude on vision tokens (Eq. 7, 8);
* ``text``: among the rest, the ``k_t`` channels whose *relative* response (percentile rank within
  each text token, Eq. 9) is least stable across text tokens, measured as the within-cluster
  variance of their rank sequence after 1-D k-means with ``K`` groups (Eq. 10, 11);
* ``main``: everything else (Eq. 12).

The heavy parts (percentile ranks over ``T x d`` and a 1-D k-means per channel) are jitted and
vectorised over all channels at once. Channel indices themselves are small static numpy arrays: they
decide shapes downstream, so they never live on the device as traced values.

Public surface:

* :func:`channel_counts` - ``(k_t, k_v)`` from ratios.
* :func:`quantile_init`, :func:`kmeans_1d` - the vectorised 1-D k-means of :mod:`splitq_jax.kmeans1d`
  (generic, re-exported here).
* :func:`percentile_ranks`, :func:`rank_instability` - Eq. 9 and Eq. 10.
* :func:`select_channels` - every selector (MOCD and the paper's Table 4 ablations) on one array.
* :class:`MocdStats`, :func:`init_stats`, :func:`update_stats`, :func:`select_from_stats` - the same
  selection accumulated over calibration batches with bounded memory.

[choice] points in this file (each is an argument, so it can be ablated):

* ``instability="kmeans" | "variance"``: Eq. 10 as written, or the plain variance of the ranks.
* ``n_clusters``: ``K`` of Eq. 10 (paper default 3; ``K = 1`` is the plain variance).
* how single-score selectors split their ``k_v + k_t`` channels into the two outlier groups
  (see :data:`SELECTORS`).
* text-only data (no vision token): the vision score falls back to the max over all tokens.
* ties in Eq. 9 share the lower rank (Eq. 9 counts *strictly* smaller magnitudes).
* ``empty_cluster="farthest" | "keep"``: what Lloyd does with an empty cluster, and
  ``kmeans_starts``: how many starts the k-means of Eq. 10 tries per channel (see
  :func:`kmeans_1d`).

A property of Eq. 10 worth knowing (tests pin it down): with ``K >= 2`` the clusters absorb a
response that switches between a few levels, so a channel that is at the bottom of the ranking on
some tokens and at the top on others is *stable* by Eq. 10 unless each level is itself spread
out; ``K = 1`` (plain variance) flags it. And Eq. 10 only separates channels when ordinary ones
have fairly stable ranks: with i.i.d. zero-mean Gaussian-like channels every ordinary rank
sequence is already ~uniform on [0, 1], which no channel can beat by much under ``K = 3``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PAD",
    "TEXT",
    "VISION",
    "SELECTORS",
    "INSTABILITY_VARIANTS",
    "ChannelSplit",
    "MocdStats",
    "channel_counts",
    "quantile_init",
    "kmeans_1d",
    "percentile_ranks",
    "rank_instability",
    "select_channels",
    "init_stats",
    "update_stats",
    "select_from_stats",
]

# Modality codes of the per-token ``modality`` array used across the project.
from splitq_jax.modality import PAD, TEXT, VISION
# The generic 1-D k-means lives apart (splitq_jax.kmeans1d); re-exported for MOCD's callers.
from splitq_jax.kmeans1d import KMEANS_STARTS, _as_mask, _lloyd_block, kmeans_1d, quantile_init  # noqa: E402,F401

# Selector -> which outlier group receives the *top* of its ranking. Single-score selectors produce
# one ranking of all channels; [choice] its top ``k`` go to the group the score is about and the next
# ones to the other group, so every selector keeps exactly MOCD's counts (|C_t| = k_t, |C_v| = k_v).
# Scores about no modality in particular (all-token scores, random) fill the vision group first,
# as MOCD does.
SELECTORS = {
    "mocd": None,  # Eq. 7-12
    "none": None,  # no outlier channels: C_t = C_v = {} (the "Base" row of Table 4)
    "random": "vision",
    "text_max": "text",
    "vision_max": "vision",
    "all_max": "vision",
    "all_mean": "vision",
}
INSTABILITY_VARIANTS = ("kmeans", "variance")

# Work sizes for the rank / k-means steps: they bound peak memory to a few hundred MB even for
# 20k tokens x 11008 channels, while keeping XLA's per-call overhead negligible.
_RANK_TOKENS_PER_CHUNK = 512
_KMEANS_ELEMS_PER_CHUNK = 1 << 25  # 32M float32 = 128 MB of ranks per rank_instability call


# --------------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelSplit:
    """Disjoint partition of ``d`` input channels into ``main`` / ``text`` / ``vision`` (Eq. 4).

    Fields are sorted ``int32`` numpy arrays; their union is ``arange(d)``. Numpy rather than jax
    arrays because downstream code uses them as static gather indices (they fix shapes).
    """

    main: np.ndarray  # (d - k_t - k_v,)
    text: np.ndarray  # (k_t,)
    vision: np.ndarray  # (k_v,)
    d: int

    def __post_init__(self):
        for name in ("main", "text", "vision"):
            arr = np.sort(np.asarray(getattr(self, name), dtype=np.int32).reshape(-1))
            arr.setflags(write=False)  # frozen means frozen: callers cannot edit indices in place
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "d", int(self.d))
        allidx = np.concatenate([self.main, self.text, self.vision])
        if allidx.size != self.d or not np.array_equal(np.sort(allidx), np.arange(self.d)):
            raise ValueError(
                f"ChannelSplit groups must be disjoint and cover range({self.d}); got sizes "
                f"main={self.main.size}, text={self.text.size}, vision={self.vision.size}"
            )

    @property
    def k_t(self) -> int:
        return int(self.text.size)

    @property
    def k_v(self) -> int:
        return int(self.vision.size)

    def masks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boolean ``(d,)`` masks ``(main, text, vision)``; exactly one is true per channel."""
        out = []
        for idx in (self.main, self.text, self.vision):
            m = np.zeros(self.d, dtype=bool)
            m[idx] = True
            out.append(m)
        return tuple(out)

    def __eq__(self, other):
        if not isinstance(other, ChannelSplit):
            return NotImplemented
        return self.d == other.d and all(
            np.array_equal(getattr(self, n), getattr(other, n)) for n in ("main", "text", "vision")
        )

    def __hash__(self):
        # Hashable so a split can be a static argument of a jitted function.
        return hash((self.d, self.main.tobytes(), self.text.tobytes(), self.vision.tobytes()))


# --------------------------------------------------------------------------------------------------
# Channel counts
# --------------------------------------------------------------------------------------------------


def channel_counts(d: int, text_ratio: float = 0.02, vision_ratio: float = 0.02) -> tuple[int, int]:
    """Outlier-group sizes ``(k_t, k_v) = (ceil(text_ratio * d), ceil(vision_ratio * d))`` (Eq. 5).

    Raises:
      ValueError: ``d < 1``, a ratio outside ``[0, 1)`` or NaN, or ``k_t + k_v >= d`` (no main
        channel would be left for the shared transform).
    """
    d = int(d)
    if d < 1:
        raise ValueError(f"channel_counts: d must be a positive channel count, got d={d}")
    for name, r in (("text_ratio", text_ratio), ("vision_ratio", vision_ratio)):
        r = float(r)
        if math.isnan(r) or r < 0.0 or r >= 1.0:
            raise ValueError(
                f"channel_counts: {name}={r!r} must be a number in [0, 1) (the paper's default is "
                f"0.02); got text_ratio={text_ratio!r}, vision_ratio={vision_ratio!r} for d={d}"
            )
    # ceil of a product that is meant to be an integer (e.g. 0.02 * 2000 = 40.000000000000004) must
    # not round up to the next channel; 1e-9 is far below any real ratio granularity.
    k_t = int(math.ceil(float(text_ratio) * d - 1e-9))
    k_v = int(math.ceil(float(vision_ratio) * d - 1e-9))
    if k_t + k_v >= d:
        raise ValueError(
            f"channel_counts: text_ratio={text_ratio} and vision_ratio={vision_ratio} give "
            f"k_t={k_t} + k_v={k_v} >= d={d} outlier channels, leaving no main channel; lower the "
            f"ratios so that ceil(text_ratio*d) + ceil(vision_ratio*d) < d"
        )
    return k_t, k_v


# --------------------------------------------------------------------------------------------------
# Eq. 9 and Eq. 10
# --------------------------------------------------------------------------------------------------


@jax.jit
def percentile_ranks(x: jax.Array) -> jax.Array:
    """Eq. 9: per-token percentile rank of each channel's magnitude, ``(T, n) -> (T, n)``.

    ``r_ij = |{j' : |x_ij'| < |x_ij|}| / (n - 1)`` with ``n`` the number of channels in ``x``
    (callers pass only the columns ``C \\ C_v``). Strictly-smaller counting means tied magnitudes
    share the *lower* rank ("min" ranking); this is what Eq. 9 says and it is deterministic, unlike
    ordinal ranks whose tie order depends on the sort. Computed by one sort per row: in sorted
    order the count of strictly smaller values is the position where the run of equal values
    starts (a running max), scattered back to channel order. That count does not depend on how
    the sort orders equal values, so the result is the same on every backend.
    """
    a = jnp.abs(jnp.asarray(x, jnp.float32))
    t, n = a.shape
    order = jnp.argsort(a, axis=-1, stable=True)
    s = jnp.take_along_axis(a, order, axis=-1)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (t, n))
    run_start = jnp.concatenate([jnp.ones((t, 1), bool), s[:, 1:] != s[:, :-1]], axis=-1)
    n_smaller = jax.lax.cummax(jnp.where(run_start, pos, 0), axis=1)
    rows = jnp.arange(t, dtype=jnp.int32)[:, None]
    counts = jnp.zeros((t, n), jnp.int32).at[rows, order].set(n_smaller, unique_indices=True)
    return counts.astype(jnp.float32) / max(n - 1, 1)


@functools.partial(
    jax.jit, static_argnames=("n_clusters", "instability", "n_iter", "empty_cluster", "kmeans_starts")
)
def rank_instability(
    ranks: jax.Array,
    n_clusters: int = 3,
    instability: str = "kmeans",
    mask: Optional[jax.Array] = None,
    n_iter: int = 40,
    empty_cluster: str = "farthest",
    *,
    kmeans_starts: int = KMEANS_STARTS,
) -> jax.Array:
    """Eq. 10: instability score per channel from its rank sequence over text tokens.

    Args:
      ranks: ``(C, T)`` percentile ranks, one row per channel (the transpose of
        :func:`percentile_ranks`' output).
      n_clusters: ``K`` of Eq. 10.
      instability: ``"kmeans"`` (Eq. 10: within-cluster variance after 1-D k-means with ``K``
        groups, ``u_j = inertia_j / |T|``) or ``"variance"`` (plain variance of the ranks; the
        same as ``"kmeans"`` with ``K = 1``).
      mask: optional ``(T,)`` / ``(C, T)`` boolean of valid tokens.
      n_iter, empty_cluster: see :func:`kmeans_1d`.
      kmeans_starts: number of k-means starts (:func:`kmeans_1d`'s ``n_init``).

    Returns:
      ``(C,)`` float32 scores; larger = less stable relative response.
    """
    if instability not in INSTABILITY_VARIANTS:
        raise ValueError(f"instability must be one of {INSTABILITY_VARIANTS}, got {instability!r}")
    ranks = jnp.asarray(ranks, jnp.float32)
    valid = None if mask is None else _as_mask(mask, ranks.shape)
    if valid is None:
        n = jnp.full(ranks.shape[:1], max(ranks.shape[1], 1), jnp.float32)
    else:
        n = jnp.maximum(jnp.sum(valid, axis=-1), 1).astype(jnp.float32)
    if instability == "variance":
        w = jnp.ones_like(ranks) if valid is None else valid.astype(jnp.float32)
        mean = jnp.sum(w * ranks, axis=-1, keepdims=True) / n[:, None]
        return jnp.sum(w * jnp.square(ranks - mean), axis=-1) / n
    _, _, inertia = kmeans_1d(ranks, n_clusters, n_iter, valid, None, empty_cluster, n_init=kmeans_starts)
    return inertia / n


def _text_instability(
    text_rows, keep, n_clusters, instability, n_iter, empty_cluster, kmeans_starts=KMEANS_STARTS
):
    """Eq. 9 + 10 on the channels ``keep`` (= C \\ C_v) of ``text_rows`` (T, d) -> (len(keep),).

    Ranks are computed a block of tokens at a time and stored channel-major; the k-means then
    runs a block of channels at a time, so peak device memory stays around two blocks.
    """
    t = text_rows.shape[0]
    n_keep = keep.size
    ranks = np.empty((n_keep, t), np.float32)  # channel-major, what rank_instability wants
    chunk = min(t, _RANK_TOKENS_PER_CHUNK)
    for lo in range(0, t, chunk):
        block = np.asarray(text_rows[lo : lo + chunk][:, keep], np.float32)
        m = block.shape[0]
        if m < chunk:  # pad the ragged last chunk: one compiled shape per layer width
            block = np.pad(block, ((0, chunk - m), (0, 0)))
        ranks[:, lo : lo + m] = np.asarray(percentile_ranks(block))[:m].T
    rows_per_chunk = max(1, _KMEANS_ELEMS_PER_CHUNK // max(t, 1))
    out = []
    for lo in range(0, n_keep, rows_per_chunk):
        out.append(
            np.asarray(
                rank_instability(
                    ranks[lo : lo + rows_per_chunk], n_clusters, instability, None, n_iter, empty_cluster,
                    kmeans_starts=kmeans_starts,
                )
            )
        )
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


# --------------------------------------------------------------------------------------------------
# Selection core (shared by the one-shot and the streaming entry points)
# --------------------------------------------------------------------------------------------------


def _top(score: np.ndarray, k: int, candidates: np.ndarray) -> np.ndarray:
    """Top-``k`` of ``score`` among ``candidates``; ties go to the lower channel index."""
    if k == 0:
        return np.zeros((0,), np.int64)
    # Stable sort of -score: equal scores keep ascending channel order, so the result never
    # depends on the backend's sort.
    order = np.argsort(-score[candidates], kind="stable")
    return candidates[order[:k]]


def _check_selector_args(selector, instability, n_clusters, k_t, k_v, d, kmeans_starts=1):
    if selector not in SELECTORS:
        raise ValueError(f"selector must be one of {sorted(SELECTORS)}, got {selector!r}")
    if instability not in INSTABILITY_VARIANTS:
        raise ValueError(f"instability must be one of {INSTABILITY_VARIANTS}, got {instability!r}")
    if int(n_clusters) < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if int(kmeans_starts) < 1:
        raise ValueError(f"kmeans_starts must be >= 1, got {kmeans_starts}")
    if k_t < 0 or k_v < 0:
        raise ValueError(f"k_t and k_v must be >= 0, got k_t={k_t}, k_v={k_v}")
    if k_t + k_v >= d:
        raise ValueError(
            f"k_t={k_t} + k_v={k_v} >= d={d} leaves no main channel; use channel_counts(d, ...) "
            f"or smaller counts"
        )


def _select_core(
    *,
    d: int,
    k_t: int,
    k_v: int,
    selector: str,
    n_clusters: int,
    instability: str,
    seed: int,
    n_iter: int,
    empty_cluster: str,
    kmeans_starts: int = KMEANS_STARTS,
    vision_max: Optional[np.ndarray],
    text_max: np.ndarray,
    all_max: np.ndarray,
    all_mean: np.ndarray,
    text_rows: Optional[np.ndarray],
) -> ChannelSplit:
    everything = np.arange(d)

    def split(vision, text):
        taken = np.zeros(d, bool)
        taken[vision] = True
        taken[text] = True
        return ChannelSplit(main=everything[~taken], text=text, vision=vision, d=d)

    if selector == "none":
        return split(np.zeros(0, np.int64), np.zeros(0, np.int64))

    if selector == "mocd":
        if vision_max is None:
            # [choice] Text-only calibration data: Eq. 7 has no vision token to look at. Keeping the
            # same counts keeps every downstream shape static, and the max over all tokens is the
            # natural magnitude-saliency stand-in (it is what Eq. 7 becomes if every token counted).
            warnings.warn(
                "MOCD: no vision tokens in the calibration data; the vision group is chosen by the "
                "max |x| over all tokens instead (Eq. 7 fallback)",
                stacklevel=3,
            )
            vision_score = all_max
        else:
            vision_score = vision_max
        vision = _top(vision_score, k_v, everything)  # Eq. 8
        rest = np.setdiff1d(everything, vision)  # C \ C_v, ascending
        if k_t == 0:
            return split(vision, np.zeros(0, np.int64))
        u = _text_instability(  # Eq. 9, 10
            text_rows, rest, n_clusters, instability, n_iter, empty_cluster, kmeans_starts
        )
        text = rest[_top(u, k_t, np.arange(rest.size))]  # Eq. 11
        return split(vision, text)  # Eq. 12: main is the rest

    if selector == "random":
        perm = np.random.default_rng(seed).permutation(d)
        ranking = perm
    else:
        score = {
            "text_max": text_max,
            "vision_max": all_max if vision_max is None else vision_max,
            "all_max": all_max,
            "all_mean": all_mean,
        }[selector]
        ranking = _top(score, k_t + k_v, everything)
    if SELECTORS[selector] == "text":
        text, vision = ranking[:k_t], ranking[k_t : k_t + k_v]
    else:
        vision, text = ranking[:k_v], ranking[k_v : k_v + k_t]
    return split(vision, text)


# --------------------------------------------------------------------------------------------------
# One-shot entry point
# --------------------------------------------------------------------------------------------------


def _check_inputs(x, modality):
    x = np.asarray(x)
    modality = np.asarray(modality)
    if x.ndim != 2:
        raise ValueError(f"x must be (N, d) layer inputs, got shape {x.shape}")
    if modality.shape != (x.shape[0],):
        raise ValueError(f"modality must be (N,) = ({x.shape[0]},), got shape {modality.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    bad_codes = np.setdiff1d(np.unique(modality), [PAD, TEXT, VISION])
    if bad_codes.size:
        raise ValueError(
            f"modality codes must be {PAD} (pad), {TEXT} (text) or {VISION} (vision); got {bad_codes}"
        )
    x = x.astype(np.float32, copy=False)
    used = x[modality != PAD]  # pad rows may hold anything; they are never read
    if not np.all(np.isfinite(used)):
        n_nan = int(np.isnan(used).sum())
        n_inf = int(np.isinf(used).sum())
        raise ValueError(
            f"x contains non-finite activations ({n_nan} NaN, {n_inf} inf) on non-pad tokens; MOCD "
            f"statistics would be meaningless - check the calibration forward pass"
        )
    return x, modality


def _masked_max(a, rows):
    """Column max of ``a`` (N, d) over the rows where ``rows`` (N,) is True; 0 if none.

    ``where=`` instead of ``a[rows]`` avoids copying the selected rows (often most of ``a``).
    """
    return np.max(a, axis=0, where=rows[:, None], initial=0.0)


def _masked_sum(a, rows):
    """Column sum of ``a`` (N, d) over the selected rows, in float64 (exact-enough means)."""
    return np.sum(a, axis=0, where=rows[:, None], dtype=np.float64)


def select_channels(
    x,
    modality,
    *,
    k_t: int,
    k_v: int,
    selector: str = "mocd",
    n_clusters: int = 3,
    instability: str = "kmeans",
    seed: int = 0,
    max_text_tokens: Optional[int] = None,
    n_iter: int = 40,
    empty_cluster: str = "farthest",
    kmeans_starts: int = KMEANS_STARTS,
) -> ChannelSplit:
    """Split the input channels of one linear layer into main / text / vision groups.

    Args:
      x: ``(N, d)`` raw layer inputs, calibration tokens pooled over samples (any float dtype;
        computed in float32).
      modality: ``(N,)`` ints, ``0`` pad (ignored), ``1`` text, ``2`` vision.
      k_t, k_v: sizes of the text / vision outlier groups (see :func:`channel_counts`).
      selector: ``"mocd"`` (Eq. 7-12) or a Table 4 ablation: ``"none"``, ``"random"``,
        ``"text_max"``, ``"vision_max"``, ``"all_max"``, ``"all_mean"`` (see :data:`SELECTORS`
        for how single-score selectors split their channels between the groups).
      n_clusters: ``K`` of Eq. 10 (paper default 3).
      instability: ``"kmeans"`` (Eq. 10) or ``"variance"`` [choice].
      seed: seeds ``"random"`` and the text-token subsample.
      max_text_tokens: if set and there are more text tokens, the rank / instability step uses a
        deterministic uniform subsample (without replacement, by ``seed``) of this many. The
        magnitude statistics (maxima, means) always use every token.
      n_iter: Lloyd steps of the Eq. 10 k-means.
      empty_cluster: its empty-cluster rule, ``"farthest"`` (scikit-learn's) or ``"keep"``.
      kmeans_starts: its number of starts, >= 1 (best inertia per channel; see
        :func:`kmeans_1d`'s ``n_init``).

    Returns:
      A :class:`ChannelSplit` with ``|text| = k_t``, ``|vision| = k_v`` (both 0 for ``"none"``).

    Raises:
      ValueError: bad shapes, codes or counts; NaN/inf activations; fewer than 2 text tokens (the
        instability of Eq. 10 needs a sequence) for a selector that looks at text tokens.
    """
    x, modality = _check_inputs(x, modality)
    d = x.shape[1]
    _check_selector_args(selector, instability, n_clusters, k_t, k_v, d, kmeans_starts)
    is_text = modality == TEXT
    is_vision = modality == VISION
    n_text = int(is_text.sum())
    # MOCD looks at text tokens only to choose the text group (Eq. 9-11); with k_t = 0 (a vision
    # tower) it is Eq. 8 alone.
    if (selector == "text_max" or (selector == "mocd" and k_t > 0)) and n_text < 2:
        raise ValueError(
            f"selector={selector!r} needs at least 2 text tokens (modality == {TEXT}), got {n_text}; "
            f"calibrate on samples with text"
        )
    valid = modality != PAD
    if not valid.any():
        raise ValueError("select_channels: every token is padding (modality == 0)")

    a = np.abs(x)
    all_max = _masked_max(a, valid)
    all_mean = (_masked_sum(a, valid) / valid.sum()).astype(np.float32)
    text_max = _masked_max(a, is_text)
    vision_max = _masked_max(a, is_vision) if is_vision.any() else None

    text_rows = None
    if selector == "mocd":
        idx = np.flatnonzero(is_text)
        if max_text_tokens is not None and idx.size > int(max_text_tokens):
            if int(max_text_tokens) < 2:
                raise ValueError(f"max_text_tokens must be >= 2, got {max_text_tokens}")
            sub = np.random.default_rng(seed).choice(idx.size, int(max_text_tokens), replace=False)
            idx = idx[np.sort(sub)]  # keep token order: results must not depend on draw order
        text_rows = x[idx]

    return _select_core(
        d=d,
        k_t=int(k_t),
        k_v=int(k_v),
        selector=selector,
        n_clusters=int(n_clusters),
        instability=instability,
        seed=int(seed),
        n_iter=int(n_iter),
        empty_cluster=empty_cluster,
        kmeans_starts=int(kmeans_starts),
        vision_max=vision_max,
        text_max=text_max,
        all_max=all_max,
        all_mean=all_mean,
        text_rows=text_rows,
    )


# --------------------------------------------------------------------------------------------------
# Streaming statistics over calibration batches
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MocdStats:
    """What MOCD and its ablations need, accumulated batch by batch in bounded memory.

    Maxima and sums are exact under streaming; the text tokens for Eq. 9-10 are a uniform
    reservoir sample (algorithm R) of at most ``capacity`` rows, drawn deterministically from
    ``seed`` and the batch order. Build with :func:`init_stats`, fold batches in with
    :func:`update_stats` (which returns a new value; nothing is modified in place).
    """

    vision_max: np.ndarray  # (d,) float32, max |x| over vision tokens
    text_max: np.ndarray  # (d,) float32, max |x| over text tokens
    all_max: np.ndarray  # (d,) float32, max |x| over non-pad tokens
    all_sum: np.ndarray  # (d,) float64, sum |x| over non-pad tokens
    n_vision: int
    n_text: int  # text tokens seen (not only those kept)
    n_all: int
    reservoir: np.ndarray  # (min(n_text, capacity), d) float32 text-token rows
    capacity: int
    seed: int
    n_batches: int


def init_stats(d: int, capacity: int = 4096, seed: int = 0) -> MocdStats:
    """Empty :class:`MocdStats` for ``d`` channels keeping up to ``capacity`` text-token rows.

    ``capacity`` plays the role of ``max_text_tokens``; 4096 x 11008 float32 is 180 MB.
    """
    if capacity < 2:
        raise ValueError(f"capacity must be >= 2 text tokens, got {capacity}")
    z = np.zeros(d, np.float32)
    return MocdStats(
        vision_max=z,
        text_max=z,
        all_max=z,
        all_sum=np.zeros(d, np.float64),
        n_vision=0,
        n_text=0,
        n_all=0,
        reservoir=np.zeros((0, d), np.float32),
        capacity=int(capacity),
        seed=int(seed),
        n_batches=0,
    )


def update_stats(stats: MocdStats, x, modality) -> MocdStats:
    """Fold one calibration batch into ``stats``.

    Args:
      stats: running statistics.
      x: ``(N, d)`` raw layer inputs of the batch (or ``(B, L, d)``, flattened).
      modality: ``(N,)`` (or ``(B, L)``) modality codes.

    Returns:
      New :class:`MocdStats`.
    """
    x = np.asarray(x)
    d = stats.all_max.shape[0]
    x, modality = _check_inputs(x.reshape(-1, x.shape[-1]), np.asarray(modality).reshape(-1))
    if x.shape[1] != d:
        raise ValueError(f"update_stats: x has {x.shape[1]} channels, stats has {d}")
    a = np.abs(x)
    is_text, is_vision, valid = modality == TEXT, modality == VISION, modality != PAD


    # Reservoir sampling (algorithm R): the i-th text token ever seen (0-based) replaces slot
    # j ~ U{0..i} if j < capacity. Drawing the j's from (seed, batch index) keeps the sample a
    # deterministic function of the data stream.
    text_rows = x[is_text]
    res = stats.reservoir
    n_new = text_rows.shape[0]
    if n_new:
        free = max(0, stats.capacity - res.shape[0])
        head, tail = text_rows[:free], text_rows[free:]
        res = np.concatenate([res, head]) if head.shape[0] else res
        if tail.shape[0]:
            seen = stats.n_text + head.shape[0] + np.arange(tail.shape[0])  # global index i
            rng = np.random.default_rng((stats.seed, stats.n_batches))
            j = (rng.random(tail.shape[0]) * (seen + 1)).astype(np.int64)
            hit = np.flatnonzero(j < stats.capacity)
            if hit.size:
                res = res.copy()
                # Later tokens overwrite earlier ones that drew the same slot, as in the
                # sequential algorithm: keep only the last hit per slot.
                slots = j[hit]
                _, last = np.unique(slots[::-1], return_index=True)
                keep = hit[::-1][last]
                res[j[keep]] = tail[keep]

    return dataclasses.replace(
        stats,
        vision_max=np.maximum(stats.vision_max, _masked_max(a, is_vision)),
        text_max=np.maximum(stats.text_max, _masked_max(a, is_text)),
        all_max=np.maximum(stats.all_max, _masked_max(a, valid)),
        all_sum=stats.all_sum + _masked_sum(a, valid),
        n_vision=stats.n_vision + int(is_vision.sum()),
        n_text=stats.n_text + n_new,
        n_all=stats.n_all + int(valid.sum()),
        reservoir=res,
        n_batches=stats.n_batches + 1,
    )


def select_from_stats(
    stats: MocdStats,
    *,
    k_t: int,
    k_v: int,
    selector: str = "mocd",
    n_clusters: int = 3,
    instability: str = "kmeans",
    seed: int = 0,
    n_iter: int = 40,
    empty_cluster: str = "farthest",
    kmeans_starts: int = KMEANS_STARTS,
) -> ChannelSplit:
    """:func:`select_channels` on accumulated :class:`MocdStats` (same arguments and result).

    With ``capacity`` at least the number of text tokens seen, the result equals
    :func:`select_channels` on the concatenated batches.
    """
    d = stats.all_max.shape[0]
    _check_selector_args(selector, instability, n_clusters, k_t, k_v, d, kmeans_starts)
    if stats.n_all == 0:
        raise ValueError("select_from_stats: no non-pad token has been accumulated")
    # As in select_channels: MOCD reads text tokens only to choose a text group (k_t > 0).
    if (selector == "text_max" or (selector == "mocd" and k_t > 0)) and stats.n_text < 2:
        raise ValueError(
            f"selector={selector!r} needs at least 2 text tokens (modality == {TEXT}), got "
            f"{stats.n_text}; calibrate on samples with text"
        )
    return _select_core(
        d=d,
        k_t=int(k_t),
        k_v=int(k_v),
        selector=selector,
        n_clusters=int(n_clusters),
        instability=instability,
        seed=int(seed),
        n_iter=int(n_iter),
        empty_cluster=empty_cluster,
        kmeans_starts=int(kmeans_starts),
        vision_max=stats.vision_max if stats.n_vision else None,
        text_max=stats.text_max,
        all_max=stats.all_max,
        all_mean=(stats.all_sum / stats.n_all).astype(np.float32),
        text_rows=stats.reservoir,
    )
