"""Calibrating several independent blocks at once: one ``jax.vmap``-ed training step over K blocks.

With full-precision block inputs (``cfg.block_inputs == "fp"``) the data of block ``i`` depends
only on the full-precision model, so blocks are independent problems of one shape. Their states
can be stacked on a new leading axis and trained by the *same* step as
:func:`splitq_jax.calibrate.make_step` (the AdamW / optax update included), vmapped and jitted once::

    qp = [init_qblock(...)[0] for each block]; qc = [...]; data = [BlockData of each block]
    opt, vstep = make_vmapped_step(cfg, bcfg, total_steps)
    sp, sc, sd = stack_trees(qp), stack_trees(qc), stack_block_data(data)
    so = stack_trees([opt.init(p) for p in qp])
    sp, so, losses = vstep(sp, so, sc, batch_stacked(sd, 0, bs))   # losses: (K,)
    per_block = unstack_tree(sp, K)

Stacking needs every block's state to have the same tree structure and leaf shapes. The MOCD
split differs per block (other channels), but its *sizes* do not: ``k_t, k_v`` come from the
input width and the ratios alone (:func:`splitq_jax.methods.splitq.mocd.channel_counts`), and so do the main
width and the branch ranks. Channel indices live in ``qconsts`` as arrays, so the vmapped step
gathers each block's own channels. :func:`stack_trees` reports the first leaf that disagrees.

:func:`fit_blocks_parallel` is :func:`splitq_jax.calibrate.fit_block` for K blocks:
statistics, initialisation and evaluation per block (host work, as before), the training steps
vmapped.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from splitq_jax import calibrate as cal
from splitq_jax.block import BlockConfig
from splitq_jax.config import MethodConfig

Tree = Any

# Default batching of BlockData fields: inputs and targets differ per block; rotary tables, the
# attention mask and the modality codes are those of the one calibration stream, shared.
SHARED_STREAM = cal.BlockData(x=0, y=0, cos=None, sin=None, mask=None, modality=None, weight=None, x_fp=0)
ALL_STACKED = cal.BlockData(x=0, y=0, cos=0, sin=0, mask=0, modality=0, weight=0, x_fp=0)


class StackError(ValueError):
    """Per-block trees that cannot be stacked (different structure or leaf shapes)."""


def _path_str(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def stack_trees(trees: Sequence[Tree]) -> Tree:
    """Stack same-shaped pytrees leaf by leaf on a new leading axis (``None`` nodes stay ``None``).

    Raises:
      StackError: empty input, different tree structures, or a leaf whose shape / dtype differs
        between trees (named by its path).
    """
    trees = list(trees)
    if not trees:
        raise StackError("nothing to stack: give at least one tree")
    leaves0, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
    flat = [leaves0]
    for i, t in enumerate(trees[1:], start=1):
        lv, td = jax.tree_util.tree_flatten_with_path(t)
        if td != treedef:
            raise StackError(f"tree {i} has another structure than tree 0:\n  {td}\nvs\n  {treedef}")
        flat.append(lv)
    out = []
    for j, (path, a0) in enumerate(leaves0):
        arrs = [f[j][1] for f in flat]
        shapes = {(tuple(np.shape(a)), jnp.result_type(a)) for a in arrs}
        if len(shapes) != 1:
            detail = ", ".join(f"tree {i}: {np.shape(a)} {jnp.result_type(a)}" for i, a in enumerate(arrs))
            raise StackError(f"leaf {_path_str(path)!r} differs between trees ({detail}); blocks of one "
                             "vmapped step need equal shapes (same channel-split sizes, ranks and widths)")
        out.append(jnp.stack([jnp.asarray(a) for a in arrs]))
    return jax.tree_util.tree_unflatten(treedef, out)


def unstack_tree(tree: Tree, k: int | None = None) -> list[Tree]:
    """Inverse of :func:`stack_trees`: the ``k`` per-block trees (``k`` defaults to the leading size)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        if k is None:
            raise ValueError("cannot infer the number of blocks of a tree without array leaves")
        return [tree for _ in range(k)]
    n = leaves[0].shape[0] if k is None else k
    for a in leaves:
        if a.shape[:1] != (n,):
            raise ValueError(f"leaf of shape {a.shape} has no leading block axis of size {n}")
    return [jax.tree_util.tree_unflatten(treedef, [a[i] for a in leaves]) for i in range(n)]


def stack_block_data(datas: Sequence[cal.BlockData], axes: cal.BlockData = SHARED_STREAM) -> cal.BlockData:
    """Stack per-block :class:`~splitq_jax.calibrate.BlockData` for the vmapped step.

    Fields with axis ``0`` in ``axes`` are stacked; fields with ``None`` are taken from block 0 and
    must be equal in every block (checked), so they are held once instead of K times.
    """
    datas = list(datas)
    if not datas:
        raise StackError("no block data to stack")
    fields = []
    for name, ax in zip(cal.BlockData._fields, axes):
        vals = [getattr(d, name) for d in datas]
        if all(v is None for v in vals):
            fields.append(None)
        elif ax is None:
            v0 = np.asarray(vals[0])
            for i, v in enumerate(vals[1:], start=1):
                if np.shape(v) != v0.shape or not np.array_equal(np.asarray(v), v0):
                    raise StackError(f"BlockData.{name} of block {i} differs from block 0 but is shared "
                                     f"in the vmapped step; stack it (axes.{name} = 0)")
            fields.append(vals[0])
        elif ax == 0:
            fields.append(stack_trees(vals))
        else:
            raise ValueError(f"axes.{name} must be 0 or None, got {ax!r}")
    return cal.BlockData(*fields)


def batch_stacked(data: cal.BlockData, start: int, size: int, axes: cal.BlockData = SHARED_STREAM) -> cal.BlockData:
    """Samples ``[start, start + size)`` of stacked block data (sample axis 1 where stacked, else 0)."""
    return cal.BlockData(*(None if a is None else a[:, start:start + size] if ax == 0 else a[start:start + size]
                           for a, ax in zip(data, axes)))


@functools.lru_cache(maxsize=32)
def make_vmapped_step(cfg: MethodConfig, bcfg: BlockConfig, total_steps: int,
                      axes: cal.BlockData = SHARED_STREAM) -> tuple[Any, Callable]:
    """The optimiser and ``jit(vmap(step))`` of :func:`splitq_jax.calibrate.make_step`'s step.

    ``(qparams, opt_state, qconsts, batch) -> (qparams, opt_state, losses)`` with every state
    stacked on a leading block axis, ``batch`` as :func:`batch_stacked`, ``losses: (K,)``.
    The optimiser is the per-block one; initialise it per block and stack (or ``vmap(opt.init)``).
    """
    opt, step = cal.make_step(cfg, bcfg, total_steps)
    return opt, jax.jit(jax.vmap(step, in_axes=(0, 0, 0, axes)))


def fit_blocks_parallel(
    block_params: Sequence[Tree],
    datas: Sequence[cal.BlockData],
    cfg: MethodConfig,
    bcfg: BlockConfig,
    *,
    keys: Sequence[jax.Array],
    stats: Sequence[dict[str, cal.GroupStats]] | None = None,
    epochs: int | None = None,
    axes: cal.BlockData = SHARED_STREAM,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[cal.CalibResult]:
    """:func:`splitq_jax.calibrate.fit_block` for K independent blocks, training vmapped.

    Block ``i`` uses ``block_params[i]``, ``datas[i]`` and ``keys[i]``; the results equal K
    separate ``fit_block`` calls up to float32 round-off. ``on_step(block, step, loss)``.
    """
    k = len(block_params)
    if not (len(datas) == len(keys) == k) or k == 0:
        raise ValueError(f"give one data set and one key per block (blocks {k}, data {len(datas)}, keys {len(keys)})")
    for d in datas:
        cal.check_inputs(d.x, bcfg)
    if stats is None:
        stats = [cal.collect_stats(p, d, cfg, bcfg, batch_size=cfg.batch_size) for p, d in zip(block_params, datas)]
    inits = [cal.init_qblock(key, p, st, cfg, bcfg) for key, p, st in zip(keys, block_params, stats)]
    init_losses = [cal.evaluate(qp, qc, d, cfg, bcfg, cfg.batch_size) for (qp, qc), d in zip(inits, datas)]
    epochs = cfg.epochs if epochs is None else epochs
    if not cfg.trains:
        epochs = 0
    s = datas[0].x.shape[0]
    if any(d.x.shape[0] != s for d in datas):
        raise ValueError("every block needs the same number of samples")
    bs = min(cfg.batch_size, s)
    per_epoch = s // bs
    epoch_losses: list[list[float]] = [[] for _ in range(k)]
    qps = [qp for qp, _ in inits]
    qcs = [qc for _, qc in inits]
    if epochs > 0:
        opt, vstep = make_vmapped_step(cfg, bcfg, epochs * per_epoch, axes)
        sp, sc = stack_trees(qps), stack_trees(qcs)
        so = stack_trees([opt.init(qp) for qp in qps])
        sd = stack_block_data(datas, axes)
        t = 0
        for _ in range(epochs):
            total = np.zeros(k)
            for j in range(per_epoch):
                sp, so, losses = vstep(sp, so, sc, batch_stacked(sd, j * bs, bs, axes))
                lv = np.asarray(losses, np.float64)
                if not np.all(np.isfinite(lv)):
                    bad = int(np.flatnonzero(~np.isfinite(lv))[0])
                    raise FloatingPointError(
                        f"calibration loss of block {bad} became {lv[bad]} at step {t}; lower the learning "
                        "rates (lr, clip_lr) or check the inputs")
                total += lv
                t += 1
                if on_step is not None:
                    for i in range(k):
                        on_step(i, t, float(lv[i]))
            for i in range(k):
                epoch_losses[i].append(float(total[i] / per_epoch))
        qps = unstack_tree(sp, k)
    results = []
    for i in range(k):
        final = cal.evaluate(qps[i], qcs[i], datas[i], cfg, bcfg, cfg.batch_size) if epochs else init_losses[i]
        results.append(cal.CalibResult(qps[i], qcs[i], init_losses[i], final, epoch_losses[i], stats[i]))
    return results


def fits(cfg: MethodConfig) -> bool:
    """Whether blocks of one shape can be trained by one vmapped step under ``cfg``: always for
    full-precision inputs; with ``block_inputs="quantized"`` block ``i + 1`` needs block ``i``'s
    finished result, so they are not independent."""
    return cfg.block_inputs == "fp"


__all__ = [
    "SHARED_STREAM", "ALL_STACKED", "StackError", "stack_trees", "unstack_tree", "stack_block_data",
    "batch_stacked", "make_vmapped_step", "fit_blocks_parallel", "fits",
]
