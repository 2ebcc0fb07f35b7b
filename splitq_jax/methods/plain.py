"""Blocks whose folded form is plain packed weights (no online transform, no channel split):
what GPTQ, GPTAQ, VLM-PTQ, AWQ and MBQ share.

* :func:`capture_jit`: the block with some groups' weights replaced (quantized) and the others
  full precision, returning what each group's linears read and the block output;
* :func:`block_loss`: the token-weighted block MSE against the full-precision targets;
* :func:`pack_codes` / :func:`fold_plain`: a linear's integer codes and the stored block.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import sharding
from splitq_jax.calib.stats import token_weight
from splitq_jax.packing import pack_quantized
from splitq_jax.quant import QParams, fake_quant
from splitq_jax.quantized.fold import storage_bits

Tree = dict[str, Any]


@functools.lru_cache(maxsize=32)
def capture_jit(bcfg: Any, a_bits: int | None, a_symmetric: bool) -> Any:
    """``(params, qweights, x, cos, sin, mask) -> ({group: input (B, N, d)}, y)``: the block with the
    groups in ``qweights`` (``{group: {name: (o, d)}}``) quantized and the others full precision.
    A group's captured input is what its quantized linears read: activation-quantized per token
    at ``a_bits`` (None: as it is). Norms (and biases) come from ``params``."""

    @jax.jit
    def capture(params, qweights, x, cos, sin, mask):
        seen: dict[str, jax.Array] = {}

        def linear(group, inp):
            xq = fake_quant(inp, a_bits, symmetric=a_symmetric)
            seen[group] = xq
            out = {}
            for name in bcfg.groups[group]:
                a, w = (xq, qweights[group][name]) if group in qweights else (inp, params[name]["w"])
                y = a @ w.T.astype(a.dtype)
                if params[name].get("b") is not None:
                    y = y + params[name]["b"].astype(a.dtype)
                out[name] = y
            return out

        y = bcfg.forward(params, linear, x, cos, sin, mask)
        return seen, y

    return capture


def block_loss(params: Tree, qweights: Tree, data: Any, cfg: Any, bcfg: Any) -> float:
    """Token-weighted block MSE against the full-precision targets ``data.y`` with ``qweights`` in
    place, over ``data``'s samples in batches of ``cfg.batch_size`` (activations quantized at
    ``cfg.a_bits`` in the quantized groups)."""
    run = capture_jit(bcfg, cfg.a_bits, cfg.a_symmetric)
    params, qweights = sharding.replicate((params, qweights))
    num = den = 0.0
    for b in sharding.batches(data, cfg.batch_size):  # split over the devices, if any
        _, y = run(params, qweights, b.x, b.cos, b.sin, b.mask)
        err = jnp.mean(jnp.square(y.astype(jnp.float32) - b.y.astype(jnp.float32)), axis=-1)
        w = token_weight(b)
        num += float(jnp.sum(err * w))
        den += float(jnp.sum(w))
    return num / max(den, 1e-12)


def rtn_weights(params: Tree, cfg: Any, bcfg: Any) -> Tree:
    """``{group: {name: (o, d)}}``: every linear rounded to nearest on ``cfg``'s weight grid (the
    reports' baseline)."""
    return {g: {n: fake_quant(jnp.asarray(params[n]["w"], jnp.float32), cfg.w_bits, symmetric=cfg.w_symmetric,
                              group_size=cfg.w_group_size) for n in names}
            for g, names in bcfg.groups.items()}


def pack_codes(p: QParams, shape: tuple[int, int], cfg: Any):
    """A linear's integer codes ``p`` (grouped as :func:`splitq_jax.quant.quantize` gives them) as a
    stored packed tensor of ``shape`` ``(o, d)``."""
    container, word = storage_bits(cfg.w_bits)
    return pack_quantized(p, container, cfg.w_symmetric, tuple(shape), cfg.w_group_size, word_dtype=word)


def fold_plain(norms: Tree, weights: Tree, biases: Tree) -> Tree:
    """The stored block: ``norms`` as they are, each group's packed main weights
    (``{group: {name: PackedTensor}}``) and biases, no transform and no channel split."""
    empty = jnp.zeros((0,), jnp.int32)
    groups = {g: {"acts": {"transform": None, "act_clip": None},
                  "split": {"main_mask": None, "main_idx": None, "text_idx": empty, "vision_idx": empty},
                  "weights": {n: {"main": w} for n, w in ws.items()},
                  "biases": dict(biases[g])}
              for g, ws in weights.items()}
    return {"norms": {k: dict(v) for k, v in norms.items()}, "groups": groups}


def check_finite_loss(loss: float, method: str) -> None:
    from splitq_jax.errors import NonFiniteError

    if not np.isfinite(loss):
        raise NonFiniteError(f"the block loss after {method} is {loss}; check the data and model")


__all__ = ["block_loss", "capture_jit", "check_finite_loss", "fold_plain", "pack_codes", "rtn_weights"]
