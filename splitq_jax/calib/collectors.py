"""Streaming statistics of one linear-group input, accumulated batch by batch in bounded memory.

A collector turns the inputs ``x: (T, d)`` a group of linears reads (tokens of one calibration
batch, flattened) into a running state whose size does not grow with the number of batches. Device
collectors are pure ``jnp`` functions (jitted once per shape by :func:`run`); MOCD's text-token
reservoir is host-side (:class:`splitq_jax.methods.splitq.mocd.MocdStats`), fed the same batches.

Every collector sees, per token, the modality code (0 pad, 1 text, 2 vision, 3 answer) and a
float32 weight ``w_t`` (0 on pads: the block data's per-token weights, which MBQ / TLQ reweight):

* ``absmax`` / mean-abs per channel: ``max_t |x_tj|``, ``sum_t |x_tj|`` and the token count over
  non-pad tokens (unweighted: a scale initialiser wants the range the quantizer will see);
* ``hessian``: ``H = sum_t w_t x_t x_t^T`` ``(d, d)`` and ``sum_t w_t`` (GPTQ's input Hessian up to
  the factor 2, before damping);
* ``cross``: ``D = sum_t w_t (x_fp,t - x_q,t) x_q,t^T`` ``(d, d)`` of paired full-precision and
  quantized-path inputs of the same tokens (GPTAQ's asymmetric term);
* ``modality_diag``: ``sum_t x_tj^2`` over vision and over text tokens separately, with their
  counts (VLM-PTQ's per-modality Hessian diagonals).

All sums are float32 on the device with ``precision=HIGHEST`` matmuls; they are order-dependent at
round-off only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax.modality import PAD, VISION, text_mask

Tree = Any
HIGHEST = jax.lax.Precision.HIGHEST


class Tokens(NamedTuple):
    """One batch of a group's input, flattened over samples and positions.

    x: (T, d) inputs; modality: (T,) int codes; weight: (T,) float32 per-token weights (0 on pads);
    x_q: (T, d) the quantized-path inputs of the same tokens (paired captures) or None.
    """

    x: jax.Array
    modality: jax.Array
    weight: jax.Array
    x_q: jax.Array | None = None


@dataclass(frozen=True)
class Collector:
    """A device statistic: ``init(d) -> state``, ``update(state, tokens) -> state`` (pure, jittable)
    and ``result(state) -> value`` (host side, once at the end)."""

    name: str
    init: Callable[[int], Tree]
    update: Callable[[Tree, Tokens], Tree]
    result: Callable[[Tree], Any]
    paired: bool = False  # needs Tokens.x_q


# --------------------------------------------------------------------------------- absmax / mean


class AbsStats(NamedTuple):
    absmax: jax.Array  # (d,) max |x| over non-pad tokens (0 if none)
    abssum: jax.Array  # (d,) sum |x| over non-pad tokens
    count: jax.Array  # () number of non-pad tokens

    @property
    def absmean(self) -> jax.Array:
        return self.abssum / jnp.maximum(self.count, 1.0)


def _abs_init(d: int) -> AbsStats:
    z = jnp.zeros((d,), jnp.float32)
    return AbsStats(z, z, jnp.zeros((), jnp.float32))


def _abs_update(st: AbsStats, t: Tokens) -> AbsStats:
    valid = (t.modality != PAD)[:, None]
    a = jnp.where(valid, jnp.abs(t.x.astype(jnp.float32)), 0.0)
    return AbsStats(jnp.maximum(st.absmax, jnp.max(a, axis=0, initial=0.0)), st.abssum + jnp.sum(a, axis=0),
                    st.count + jnp.sum(valid, dtype=jnp.float32))


# ------------------------------------------------------------------------------ second moments


class SecondMoment(NamedTuple):
    matrix: jax.Array  # (d, d)
    weight_sum: jax.Array  # () sum of token weights


def _moment_init(d: int) -> SecondMoment:
    return SecondMoment(jnp.zeros((d, d), jnp.float32), jnp.zeros((), jnp.float32))


def _weighted_outer(a: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
    """``sum_t w_t a_t b_t^T`` for ``a, b: (T, d)``, ``w: (T,)``; pads (w = 0) are zeroed first so a
    NaN in a pad row cannot leak in (0 * NaN is NaN)."""
    keep = (w > 0)[:, None]
    a = jnp.where(keep, a.astype(jnp.float32), 0.0) * w[:, None]
    b = jnp.where(keep, b.astype(jnp.float32), 0.0)
    return jnp.matmul(a.T, b, precision=HIGHEST)


def _hessian_update(st: SecondMoment, t: Tokens) -> SecondMoment:
    return SecondMoment(st.matrix + _weighted_outer(t.x, t.x, t.weight), st.weight_sum + jnp.sum(t.weight))


def _cross_update(st: SecondMoment, t: Tokens) -> SecondMoment:
    if t.x_q is None:
        raise ValueError("the cross-term collector needs paired captures (Tokens.x_q)")
    diff = t.x.astype(jnp.float32) - t.x_q.astype(jnp.float32)
    return SecondMoment(st.matrix + _weighted_outer(diff, t.x_q, t.weight), st.weight_sum + jnp.sum(t.weight))


# ------------------------------------------------------------------------- per-modality diagonal


class ModalityDiag(NamedTuple):
    vision: jax.Array  # (d,) sum of x^2 over vision tokens
    text: jax.Array  # (d,) sum of x^2 over text tokens (modality.text_mask, "non_vision")
    n_vision: jax.Array  # ()
    n_text: jax.Array  # ()


def _diag_init(d: int) -> ModalityDiag:
    z, n = jnp.zeros((d,), jnp.float32), jnp.zeros((), jnp.float32)
    return ModalityDiag(z, z, n, n)


def _diag_update(st: ModalityDiag, t: Tokens) -> ModalityDiag:
    sq = jnp.square(t.x.astype(jnp.float32))
    is_v = t.modality == VISION
    is_t = text_mask(t.modality, "non_vision")
    return ModalityDiag(st.vision + jnp.sum(jnp.where(is_v[:, None], sq, 0.0), axis=0),
                        st.text + jnp.sum(jnp.where(is_t[:, None], sq, 0.0), axis=0),
                        st.n_vision + jnp.sum(is_v, dtype=jnp.float32),
                        st.n_text + jnp.sum(is_t, dtype=jnp.float32))


def _to_host(st: Tree) -> Tree:
    return jax.tree_util.tree_map(np.asarray, st)


COLLECTORS: dict[str, Collector] = {
    "absmax": Collector("absmax", _abs_init, _abs_update, _to_host),
    "hessian": Collector("hessian", _moment_init, _hessian_update, _to_host),
    "cross": Collector("cross", _moment_init, _cross_update, _to_host, paired=True),
    "modality_diag": Collector("modality_diag", _diag_init, _diag_update, _to_host),
}


def get_collector(name: str) -> Collector:
    if name not in COLLECTORS:
        raise ValueError(f"unknown statistic {name!r}: choose one of {', '.join(COLLECTORS)}")
    return COLLECTORS[name]


@functools.lru_cache(maxsize=None)
def _update_jit(names: tuple[str, ...]) -> Callable:
    """One jitted update of several collectors over the same tokens (one dispatch per batch)."""

    @jax.jit
    def update(states, tokens):
        return tuple(COLLECTORS[n].update(s, tokens) for n, s in zip(names, states))

    return update


class Accumulator:
    """The running states of several named device collectors over one group input of width ``d``."""

    def __init__(self, names: tuple[str, ...], d: int):
        self.names = tuple(names)
        self.states = tuple(get_collector(n).init(d) for n in self.names)

    def update(self, tokens: Tokens) -> None:
        if self.names:
            self.states = _update_jit(self.names)(self.states, tokens)

    def results(self) -> dict[str, Any]:
        return {n: get_collector(n).result(s) for n, s in zip(self.names, self.states)}


def run(batches, names: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, Any]]:
    """Accumulate ``names[group]`` over ``batches``: an iterable of ``{group: Tokens}``.

    Returns ``{group: {statistic: result}}``; groups without statistics get ``{}``."""
    accs: dict[str, Accumulator] = {}
    for batch in batches:
        for g, want in names.items():
            if not want:
                continue
            tokens = batch[g]
            if g not in accs:
                accs[g] = Accumulator(want, int(tokens.x.shape[-1]))
            accs[g].update(tokens)
    return {g: (accs[g].results() if g in accs else {}) for g in names}
