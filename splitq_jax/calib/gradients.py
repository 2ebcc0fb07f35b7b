"""The whole-model gradient pass (MBQ, TLQ): how much the supervised answer loss depends on the
output of chosen linears, per token.

For each calibration sample of a :class:`~splitq_jax.pipeline.Stream` (one at a time), the
full-precision decoder runs from the stream's embeddings through every block and the head, and
the loss is the mean cross-entropy of the answer tokens (position ``t`` predicts token ``t + 1``
when that token is an answer, modality code 3; HF's ``labels`` with every other position -100).
MBQ's "answer" averages are over the positions that predict an answer (:func:`answer_mask`).
At the output ``y`` of each tapped linear (``o_proj``, ``down_proj``, ...) of each layer a probe
``p`` is added, ``y + p`` with ``p = 0``, so that ``dL/dp = dL/dy`` exactly; the pass returns its
per-token reduction ``m[l, k, t] = mean_c |dL/dy[t, c]|`` (layer ``l``, tap ``k``) and never the
full gradients: the probe is a ``custom_vjp`` whose backward reduces the cotangent on the spot
(``full=True`` returns ``dL/dy`` itself, for tests). Each block is rematerialised in the backward
pass (``jax.checkpoint``), so the memory is one sample's block inputs plus one block's activations.

The blocks run through :meth:`BlockConfig.forward` with each layer's own ``block_params`` (the
one block body of the model, calibration and runtime). The embeddings are the stream's: the pass
does not differentiate through the vision tower (MBQ taps the language model only).

Data without answer tokens (plain text, e.g. code): every text token is an answer, the
language-model loss over the whole sequence; ``GradientResult.fallback`` says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from splitq_jax.block import BlockConfig
from splitq_jax.errors import NonFiniteError
from splitq_jax.modality import ANSWER, TEXT, VISION

# MBQ's taps: attention groups use o_proj's ratio, MLP groups down_proj's.
DEFAULT_TAPS = ("o_proj", "down_proj")


@dataclass
class GradientResult:
    """``magnitudes``: ``(S, L, K, N)`` float32, ``mean_c |dL/dy|`` per sample, layer, tap
    (``taps``) and token (0 at pads); ``losses``: ``(S,)`` each sample's answer loss;
    ``answer``: ``(S, N)`` bool, the positions that predict an answer (:func:`answer_mask`);
    ``fallback``: None, or why the answers are every text token."""

    magnitudes: np.ndarray
    losses: np.ndarray
    taps: tuple[str, ...]
    answer: np.ndarray
    fallback: str | None = None

    def save(self, path) -> None:
        from splitq_jax.fsutil import atomic_file

        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, magnitudes=self.magnitudes, losses=self.losses, taps=np.array(self.taps),
                     answer=self.answer, fallback=np.array(self.fallback or ""))

    @classmethod
    def load(cls, path) -> "GradientResult":
        with np.load(path) as z:
            return cls(z["magnitudes"], z["losses"], tuple(str(t) for t in z["taps"]), z["answer"],
                       str(z["fallback"]) or None)


def answer_mask(modality: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``(S, N)`` bool: the positions that predict an answer token (``t`` where token ``t + 1`` is
    an answer), or that predict any text token when the data has no answer (then the reason as
    the second value).

    These are the positions whose outputs the answer loss reads. MBQ's code averages over the
    answer tokens' own positions instead (HF ``labels != -100``), one position later: with
    one-token answers (easy-vqa) those positions feed no answer prediction at all and every
    gradient there is exactly 0, so we take the predicting positions (our choice)."""
    modality = np.asarray(modality)
    fallback = None
    target = modality == ANSWER
    if not target.any():
        target = (modality == TEXT) | (modality == ANSWER)
        fallback = "the calibration data has no answer tokens: every text token counts as an answer (the LM loss)"
    predicts = np.zeros_like(target)
    predicts[:, :-1] = target[:, 1:] & (modality[:, :-1] != 0)
    return predicts, fallback


@jax.custom_vjp
def _probe(y: jax.Array, p: jax.Array) -> jax.Array:
    """``y`` (forward); backward: ``dL/dy`` passes on and ``p`` (``(B, N)``) receives
    ``mean_c |dL/dy|`` instead of a gradient (the reduction, computed where the cotangent is)."""
    return y


def _probe_fwd(y, p):
    return y, None


def _probe_bwd(_, g):
    return g, jnp.mean(jnp.abs(g.astype(jnp.float32)), axis=-1)


_probe.defvjp(_probe_fwd, _probe_bwd)


def _answer_loss(logits: jax.Array, ids: jax.Array, predicts: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits[:, t]`` against ``ids[:, t + 1]`` where ``predicts[:, t]``."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = predicts[:, :-1].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.lru_cache(maxsize=8)
def _pass_jit(bcfg: Any, taps: tuple[str, ...], full: bool) -> Callable:
    """``(decoder, x, cos, sin, mask, ids, answer) -> (loss, {(l, tap): grads})`` for one sample
    ``(1, N, ...)``; grads are ``(1, N)`` reductions, or ``(1, N, o)`` with ``full``."""

    def loss_of(probes, decoder, x, cos, sin, mask, ids, answer):
        for i, layer in enumerate(decoder.layers):
            params = layer.block_params()

            def block(x, params, probe_i):
                def linear(group, inp):
                    out = {}
                    for name in bcfg.groups[group]:
                        y = inp @ params[name]["w"].T.astype(inp.dtype)
                        if params[name].get("b") is not None:
                            y = y + params[name]["b"].astype(inp.dtype)
                        if name in probe_i:
                            y = y + probe_i[name] if full else _probe(y, probe_i[name])
                        out[name] = y
                    return out

                return bcfg.forward(params, linear, x, cos, sin, mask)

            x = jax.checkpoint(block)(x, params, {t: probes[(i, t)] for t in taps})
        return _answer_loss(decoder.head(x), ids, answer)

    @nnx.jit
    def run(decoder, probes, x, cos, sin, mask, ids, answer):
        return jax.value_and_grad(lambda p: loss_of(p, decoder, x, cos, sin, mask, ids, answer))(probes)

    return run


def _probes(decoder, bcfg: Any, taps: tuple[str, ...], n: int, full: bool) -> dict:
    out = {}
    for i, layer in enumerate(decoder.layers):
        params = layer.block_params()
        for t in taps:
            out[(i, t)] = jnp.zeros((1, n, params[t]["w"].shape[0]) if full else (1, n), jnp.float32)
    return out


def gradient_pass(model: Any, stream: Any, *, taps: tuple[str, ...] = DEFAULT_TAPS, full: bool = False,
                  on_sample: Callable[[int, int], None] | None = None) -> GradientResult | dict:
    """Run the pass over every sample of ``stream`` (which must carry ``input_ids``).

    Returns a :class:`GradientResult`; with ``full``, ``{(sample, layer, tap): dL/dy (N, o)}`` instead
    (tests). ``on_sample(done, total)`` after each sample. A non-finite loss or gradient is a
    :class:`~splitq_jax.errors.NonFiniteError` naming the sample.
    """
    if getattr(stream, "input_ids", None) is None:
        raise ValueError("the gradient pass needs the stream's input_ids (pipeline.embed_batches keeps them)")
    bcfg = BlockConfig.from_decoder(model.config.text)
    decoder = model.language_model
    names = set(decoder.layers[0].block_params())
    unknown = [t for t in taps if t not in names]
    if unknown:
        raise ValueError(f"unknown tap {', '.join(unknown)}: the decoder's linears are {', '.join(sorted(names))}")
    s, n = stream.modality.shape
    answer, fallback = answer_mask(np.asarray(stream.modality))
    run = _pass_jit(bcfg, tuple(taps), full)
    probes = _probes(decoder, bcfg, tuple(taps), n, full)
    n_layers = len(decoder.layers)
    mags = np.zeros((s, n_layers, len(taps), n), np.float32)
    losses = np.zeros((s,), np.float32)
    grads_full = {}
    for j in range(s):
        one = slice(j, j + 1)
        loss, grads = run(decoder, probes, stream.x[one], stream.cos[one], stream.sin[one], stream.mask_for(0)[one],
                          stream.input_ids[one], jnp.asarray(answer[one]))
        loss = float(loss)
        got = {k: np.asarray(v[0]) for k, v in grads.items()}
        if not np.isfinite(loss) or not all(np.all(np.isfinite(v)) for v in got.values()):
            raise NonFiniteError(f"the gradient pass gives a non-finite loss or gradient on calibration sample {j} "
                                 "(check that sample and the model weights; float16 weights often overflow)")
        losses[j] = loss
        if full:
            grads_full.update({(j, i, t): v for (i, t), v in got.items()})
        else:
            stacked = np.stack([np.stack([got[(i, t)] for t in taps]) for i in range(n_layers)])
            mags[j] = stacked * (np.asarray(stream.modality[j]) != 0)
        if on_sample is not None:
            on_sample(j + 1, s)
    if full:
        return grads_full
    return GradientResult(mags, losses, tuple(taps), answer, fallback)


def layer_ratios(result: GradientResult, modality: np.ndarray) -> np.ndarray:
    """MBQ's raw layer ratios ``(L, K)``: per sample the mean magnitude over its vision tokens and
    over its answer tokens, each averaged over the samples that have such tokens, then vision /
    answer. Needs vision tokens (see :func:`modality_ratios`)."""
    vis = np.asarray(modality) == VISION
    mags = result.magnitudes.astype(np.float64)

    def per_sample_mean(mask):
        has = mask.any(axis=1)
        m = (mags * mask[:, None, None, :]).sum(-1) / np.maximum(mask.sum(-1), 1)[:, None, None]
        return m[has].mean(axis=0)

    return per_sample_mean(vis) / np.maximum(per_sample_mean(result.answer), 1e-30)


GRADIENTS_FILE = "gradients.npz"  # in a run's work directory


def cached_gradient_pass(model: Any, stream: Any, *, work_dir: Any = None, resume: bool = False,
                         on_sample: Callable[[int, int], None] | None = None) -> GradientResult:
    """:func:`gradient_pass` with MBQ's taps, or its saved result when resuming; saved atomically
    in ``work_dir`` once complete (before block 0 starts)."""
    from pathlib import Path

    path = None if work_dir is None else Path(work_dir) / GRADIENTS_FILE
    if resume and path is not None and path.exists():
        return GradientResult.load(path)
    result = gradient_pass(model, stream, taps=DEFAULT_TAPS, on_sample=on_sample)
    if path is not None:
        result.save(path)
    return result


def modality_ratios(result: GradientResult, modality: np.ndarray) -> tuple[np.ndarray, str | None]:
    """MBQ's vision weights ``(L, K)``: :func:`layer_ratios` floored at their median over the
    layers, per tap (``max(r_l, median_l r)``). Data without vision tokens: every weight is 1 (no
    token has the vision weight), and the reason as the second value."""
    if not (np.asarray(modality) == VISION).any():
        n_layers, k = result.magnitudes.shape[1:3]
        return np.ones((n_layers, k), np.float32), "the calibration data has no vision tokens: no vision weight to set"
    ratio = layer_ratios(result, modality)
    return np.maximum(ratio, np.median(ratio, axis=0, keepdims=True)).astype(np.float32), None


def token_importance(result: GradientResult) -> np.ndarray:
    """``(S, L, N)``: each token's importance for each layer, the mean over the taps of
    ``mean_c |dL/dy|`` (TLQ's per-token reading; 0 at pads)."""
    return result.magnitudes.mean(axis=2)


__all__ = ["DEFAULT_TAPS", "GRADIENTS_FILE", "GradientResult", "answer_mask", "cached_gradient_pass", "gradient_pass",
           "layer_ratios", "modality_ratios", "token_importance"]
