"""Per-block calibration (spec Eq. 3 and the recipe): statistics, initialisation, jitted training step.

Flow for one block::

    stats = collect_stats(block_params, data, bcfg)              # group inputs -> MOCD split, maxima
    qparams, qconsts = init_qblock(key, block_params, stats, cfg, bcfg)
    result = fit_block(block_params, data, cfg, bcfg, key=key)   # does all of the above + training

``data`` is a :class:`BlockData`: the block inputs (full-precision or quantized outputs of the previous
block), the full-precision targets, rotary tables, attention mask and per-token modality.
Modality codes: 0 pad, 1 text, 2 vision, 3 text that is part of an answer (counts as text).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from splitq_jax import sharding
from splitq_jax.methods.splitq import split_linear as sl
from splitq_jax.block import BlockConfig, fp_block
from splitq_jax.calib.stats import GroupStats, Selection, collect_group_stats, group_inputs_jit  # noqa: F401
from splitq_jax.config import MethodConfig, as_engine
from splitq_jax.errors import NonFiniteError
from splitq_jax.finite import first_nonfinite

from splitq_jax.modality import ANSWER, PAD, TEXT, VISION, text_mask  # noqa: F401  (re-exported)
Tree = dict[str, Any]


class BlockData(NamedTuple):
    """Calibration data of one block; leading axis = samples.

    x: (S, N, d) block inputs; y: (S, N, d) full-precision targets; cos, sin: (S, N, hd);
    mask: (S, N, N) bool attention mask; modality: (S, N) int codes; weight: (S, N) float32
    per-token weights of the block loss and of weighted statistics (e.g. the Hessian), or None:
    1 on every non-pad token (methods such as MBQ and TLQ set their own); x_fp: (S, N, d) the
    full-precision path's block inputs when ``x`` is the quantized path's (paired captures, e.g.
    GPTAQ's cross term), else None (``x`` is both).
    """

    x: jax.Array
    y: jax.Array
    cos: jax.Array
    sin: jax.Array
    mask: jax.Array
    modality: jax.Array
    weight: jax.Array | None = None
    x_fp: jax.Array | None = None

    def batch(self, start: int, size: int) -> "BlockData":
        return BlockData(*(None if a is None else a[start:start + size] for a in self))


@functools.lru_cache(maxsize=16)
def fp_block_jit(bcfg: BlockConfig) -> Callable:
    """``jit(fp_block)`` for one block shape: ``(params, x, cos, sin, mask) -> y``."""
    return jax.jit(lambda p, x, c, s, m: fp_block(p, x, c, s, m, bcfg))


def make_block_data(block_params, x, cos, sin, mask, modality, bcfg: BlockConfig, x_quant=None,
                    weight=None) -> BlockData:
    """Targets are the full-precision block applied to ``x``; the quantized block reads ``x_quant``
    (the previous block's quantized output) when given, else ``x`` too. ``weight``: optional
    ``(S, N)`` per-token weights (see :class:`BlockData`)."""
    check_inputs(x, bcfg)
    if x_quant is not None:
        check_inputs(x_quant, bcfg)
    y = fp_block_jit(bcfg)(block_params, x, cos, sin, mask)
    if not bool(jnp.all(jnp.isfinite(y))):
        raise NonFiniteError(
            "the full-precision block gives NaN or inf on the calibration inputs (its targets); the "
            "model weights or the inputs overflow (float16 weights are a common cause: use float32 or bfloat16)")
    if weight is not None:
        weight = jnp.asarray(weight, jnp.float32)
        if weight.shape != tuple(modality.shape) or not bool(jnp.all(jnp.isfinite(weight) & (weight >= 0))):
            raise ValueError(f"per-token weights must be finite, >= 0 and of shape {tuple(modality.shape)}")
    return BlockData(x if x_quant is None else x_quant, y, cos, sin, mask, jnp.asarray(modality, jnp.int32), weight,
                     None if x_quant is None else x)


def check_inputs(x: jax.Array, bcfg: BlockConfig) -> None:
    if x.ndim != 3 or x.shape[-1] != bcfg.hidden:
        raise ValueError(f"block inputs have shape {x.shape}; expected (samples, tokens, {bcfg.hidden})")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise NonFiniteError(
            "calibration inputs contain NaN or inf; check the previous block's outputs or the "
            "calibration data (a float16 overflow is a common cause: use float32 or bfloat16)"
        )


def text_mask_of(modality: jax.Array, cfg: MethodConfig) -> jax.Array:
    """Tokens that count as text (MOCD's T set, MAC's token mask) under ``cfg.text_tokens``."""
    return text_mask(modality, cfg.text_tokens)


def group_is_split(group: str, cfg: MethodConfig) -> bool:
    """Whether MOCD splits ``group``'s input channels (o_proj's input only with ``mocd_o_proj``)."""
    return cfg.split and (group != "attn_out" or cfg.mocd_o_proj)


# ---------------------------------------------------------------------------------------------
# Statistics


def group_transformed(group: str, cfg: MethodConfig, bcfg: BlockConfig) -> bool:
    """Whether ``group``'s input gets the main transform: every group, or with
    ``transform_groups="norm_fed"`` only those a norm feeds (where the diagonal folds away)."""
    return cfg.transform and (cfg.transform_groups == "all" or group in bcfg.group_norm)


def engine_statistics(cfg: MethodConfig, bcfg: BlockConfig) -> tuple[dict[str, tuple[str, ...]], dict[str, Selection]]:
    """What the engine's initialisation reads, per group: the device statistics (absmax for a
    SmoothQuant-style diagonal) and the MOCD channel selection of the groups it splits."""
    wanted = {g: ("absmax",) if group_transformed(g, cfg, bcfg) and cfg.diag_init == "smooth" else ()
              for g in bcfg.groups}
    split = {g: Selection(cfg.text_ratio, cfg.vision_ratio, selector=cfg.selector, n_clusters=cfg.n_clusters,
                          instability=cfg.instability, empty_cluster=cfg.empty_cluster,
                          kmeans_starts=cfg.kmeans_starts, text_tokens=cfg.text_tokens, seed=cfg.seed)
             for g in bcfg.groups if group_is_split(g, cfg)}
    return wanted, split


def collect_stats(block_params: Tree, data: BlockData, cfg: MethodConfig, bcfg: BlockConfig,
                  batch_size: int = 4) -> dict[str, GroupStats]:
    """The statistics ``cfg`` needs, from the full-precision block over ``data.x``
    (:func:`splitq_jax.calib.stats.collect_group_stats`: streamed, bounded memory)."""
    wanted, split = engine_statistics(as_engine(cfg), bcfg)
    return collect_group_stats(block_params, data, bcfg, wanted, split, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# Quantized block


def init_qblock(key: jax.Array, block_params: Tree, stats: dict[str, GroupStats], cfg: MethodConfig,
                bcfg: BlockConfig) -> tuple[Tree, Tree]:
    """``(qparams, qconsts)`` of the quantized block: one split group per entry of ``bcfg.groups``."""
    qparams: Tree = {}
    qconsts: Tree = {"norms": {k: block_params[k] for k in bcfg.norm_keys}}
    groups = bcfg.groups
    for g, key_g in zip(groups, jax.random.split(key, len(groups))):
        weights = {n: block_params[n] for n in groups[g]}
        st = stats[g]
        qparams[g], qconsts[g] = sl.init_group(
            key_g, weights, cfg, text_idx=st.text_idx, vision_idx=st.vision_idx, act_absmax=st.absmax,
            transform=group_transformed(g, cfg, bcfg),
        )
    return qparams, qconsts


def qblock_forward(qparams: Tree, qconsts: Tree, x, cos, sin, mask, modality, cfg: MethodConfig,
                   bcfg: BlockConfig, *, quantize: bool = True) -> jax.Array:
    """The quantized (fake-quant) block. Shapes as :func:`splitq_jax.block.block_forward`."""
    tmask = text_mask_of(modality, cfg)

    def linear(group: str, inp: jax.Array) -> dict[str, jax.Array]:
        return sl.group_forward(qparams[group], qconsts[group], inp, tmask, cfg, quantize=quantize)

    return bcfg.forward(qconsts["norms"], linear, x, cos, sin, mask)


def token_weights(modality: jax.Array, cfg: MethodConfig, weight: jax.Array | None = None) -> jax.Array:
    """Per-token loss weights: 0 on pads, the modality weights elsewhere, times the block data's
    own per-token ``weight`` when it has one."""
    w = jnp.where(modality == VISION, cfg.loss_vision_weight, cfg.loss_text_weight)
    w = jnp.where(modality == PAD, 0.0, w).astype(jnp.float32)
    return w if weight is None else w * weight


def block_mse(out: jax.Array, target: jax.Array, modality: jax.Array, cfg: MethodConfig,
              weight: jax.Array | None = None) -> jax.Array:
    """Token-weighted mean squared error of the block output (mean over channels and tokens)."""
    err = jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
    w = token_weights(modality, cfg, weight)
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1e-12)


def loss_fn(qparams: Tree, qconsts: Tree, batch: BlockData, cfg: MethodConfig, bcfg: BlockConfig) -> jax.Array:
    out = qblock_forward(qparams, qconsts, batch.x, batch.cos, batch.sin, batch.mask, batch.modality, cfg, bcfg)
    return block_mse(out, batch.y, batch.modality, cfg, batch.weight)


# ---------------------------------------------------------------------------------------------
# Optimiser


def param_labels(qparams: Tree, cfg: MethodConfig) -> Tree:
    """Optimiser group of every leaf: ``"clip"`` (clipping logits), ``"main"`` or ``"frozen"``."""

    def label(path, _leaf) -> str:
        keys = [getattr(p, "key", None) for p in path]
        last = keys[-1]
        if any(isinstance(k, str) and k.endswith("clip") for k in keys):
            return "clip" if cfg.learn_clip else "frozen"
        if isinstance(last, str) and last.endswith("_gate"):
            return "main" if cfg.learn_gates else "frozen"
        if last == "c":
            return "main" if cfg.learn_diag else "frozen"
        if last in ("p1", "p2", "p"):
            return "main" if cfg.learn_transform else "frozen"
        raise AssertionError(f"unlabelled parameter {keys}")

    return jax.tree_util.tree_map_with_path(label, qparams)


def make_optimizer(cfg: MethodConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with cosine decay to ``final_lr_ratio * lr``; clipping logits at ``clip_lr``."""
    steps = max(total_steps, 1)

    def adamw(lr: float) -> optax.GradientTransformation:
        sched = optax.cosine_decay_schedule(lr, steps, alpha=cfg.final_lr_ratio)
        return optax.adamw(sched, weight_decay=cfg.weight_decay)

    return optax.multi_transform(
        {"main": adamw(cfg.lr), "clip": adamw(cfg.clip_lr), "frozen": optax.set_to_zero()},
        functools.partial(param_labels, cfg=cfg),
    )


def _loss_and_grad(cfg: MethodConfig, bcfg: BlockConfig) -> Callable:
    """``(qparams, qconsts, batch) -> (loss, grads)``: the gradient every calibration step applies.

    Under a data mesh (:mod:`splitq_jax.sharding`) the batch is split over the devices and the
    token-weighted mean of the loss is global, so XLA's partitioner reduces the gradient once:
    the result is the one-device gradient, not a per-device sum (tests compare the two)."""

    def objective(qparams, qconsts, batch):
        loss = loss_fn(qparams, qconsts, batch, cfg, bcfg)
        # FlatQuant divides by the detached loss: the gradient scale no longer depends on the
        # block's output magnitude, which differs by orders of magnitude across depth.
        scaled = loss / jax.lax.stop_gradient(loss) if cfg.normalize_loss else loss
        return scaled, loss

    def loss_and_grad(qparams, qconsts, batch):
        (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(qparams, qconsts, batch)
        return loss, grads

    return loss_and_grad


@functools.lru_cache(maxsize=8)
def block_gradient(cfg: MethodConfig, bcfg: BlockConfig) -> Callable:
    """``jit`` of :func:`_loss_and_grad`: ``(qparams, qconsts, batch) -> (loss, grads)``."""
    return jax.jit(_loss_and_grad(cfg, bcfg))


@functools.lru_cache(maxsize=32)
def make_step(cfg: MethodConfig, bcfg: BlockConfig, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """The optimiser and one jitted calibration step
    ``(qparams, opt_state, qconsts, batch) -> (qparams, opt_state, loss)`` (cached per configuration)."""
    opt = make_optimizer(cfg, total_steps)
    loss_and_grad = _loss_and_grad(cfg, bcfg)

    @jax.jit
    def step(qparams, opt_state, qconsts, batch):
        loss, grads = loss_and_grad(qparams, qconsts, batch)
        updates, opt_state = opt.update(grads, opt_state, qparams)
        return optax.apply_updates(qparams, updates), opt_state, loss

    return opt, step


@functools.lru_cache(maxsize=64)
def _eval_sums(cfg: MethodConfig, bcfg: BlockConfig, quantize: bool) -> Callable:
    @jax.jit
    def sums(qp, qc, b):
        out = qblock_forward(qp, qc, b.x, b.cos, b.sin, b.mask, b.modality, cfg, bcfg, quantize=quantize)
        err = jnp.mean(jnp.square(out.astype(jnp.float32) - b.y.astype(jnp.float32)), axis=-1)
        w = token_weights(b.modality, cfg, b.weight)
        return jnp.sum(err * w), jnp.sum(w)

    return sums


def evaluate(qparams: Tree, qconsts: Tree, data: BlockData, cfg: MethodConfig, bcfg: BlockConfig,
             batch_size: int = 4, quantize: bool = True) -> float:
    """Token-weighted block MSE over all of ``data`` (the reported block loss)."""
    sums = _eval_sums(cfg, bcfg, quantize)
    num = den = 0.0
    for b in sharding.batches(data, batch_size):
        n_, d_ = sums(qparams, qconsts, b)
        num, den = num + float(n_), den + float(d_)
    return num / max(den, 1e-12)


def check_state(qparams: Tree, qconsts: Tree, final_loss: float, cfg: MethodConfig, *, trained: bool) -> None:
    """Raise :class:`NonFiniteError` if the calibrated state or its loss is not finite, naming the
    group and the likely cause (training diverged, or the statistics were already bad)."""
    cause = (f"the training diverged; lower the learning rates (--lr {cfg.lr:g}, --clip-lr {cfg.clip_lr:g})"
             if trained else "the calibration statistics or weights are not finite; check the data and model")
    for part in (qparams, qconsts):
        where = first_nonfinite(part)
        if where is not None:
            raise NonFiniteError(f"the calibrated state of group {where.split('/')[0]} holds non-finite "
                                 f"values (at {where}): {cause}")
    if not math.isfinite(final_loss):
        raise NonFiniteError(f"the block loss after calibration is {final_loss}: {cause}")


@dataclass
class CalibResult:
    qparams: Tree
    qconsts: Tree
    init_loss: float
    final_loss: float
    epoch_losses: list[float]
    stats: dict[str, GroupStats]
    # A weight back end's rounding of each linear's main weight ({group: {name: Solution}};
    # ``--weight-solver gptq``), which the fold stores instead of rounding to nearest; None: none.
    solved: dict[str, dict[str, Any]] | None = None


def fit_block(
    block_params: Tree,
    data: BlockData,
    cfg: MethodConfig,
    bcfg: BlockConfig,
    *,
    key: jax.Array | None = None,
    stats: dict[str, GroupStats] | None = None,
    epochs: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> CalibResult:
    """The transform engine's per-block step: statistics, initialisation, ``epochs`` passes of
    the jitted step (none for closed-form settings). Methods reach it through
    :meth:`splitq_jax.methods.transform.TransformMethod.calibrate_block`.

    Steps per epoch are ``samples // batch_size`` (FlatQuant), in a fixed order.
    """
    cfg = as_engine(cfg)
    check_inputs(data.x, bcfg)
    if sharding.current_mesh() is not None:
        # Data parallel: the block's calibration cache stays in host memory and every batch is
        # streamed to the devices split over them, so a device holds one batch, not the cache.
        data = jax.device_get(data)
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    if stats is None:
        stats = collect_stats(block_params, data, cfg, bcfg, batch_size=cfg.batch_size)
    # on a data mesh the learned state lives on every device; the batches are split over them
    qparams, qconsts = sharding.replicate(init_qblock(key, block_params, stats, cfg, bcfg))
    init_loss = evaluate(qparams, qconsts, data, cfg, bcfg, cfg.batch_size)
    epochs = cfg.epochs if epochs is None else epochs
    if not cfg.trains:
        epochs = 0
    s = data.x.shape[0]
    bs = min(cfg.batch_size, s)
    per_epoch = s // bs
    epoch_losses: list[float] = []
    if epochs > 0:
        opt, step = make_step(cfg, bcfg, epochs * per_epoch)
        opt_state = opt.init(qparams)
        t = 0
        for _ in range(epochs):
            total = 0.0
            for j in range(per_epoch):
                qparams, opt_state, loss = step(qparams, opt_state, qconsts,
                                                sharding.shard_batch(data.batch(j * bs, bs)))
                lv = float(loss)
                if not math.isfinite(lv):
                    raise NonFiniteError(
                        f"the calibration loss became {lv} at step {t + 1} (epoch {t // per_epoch + 1}): the "
                        f"training diverged; lower the learning rates (--lr {cfg.lr:g}, --clip-lr "
                        f"{cfg.clip_lr:g}) or check the calibration data"
                    )
                total += lv
                t += 1
                if on_step is not None:
                    on_step(t, lv)
            epoch_losses.append(total / per_epoch)
    final_loss = evaluate(qparams, qconsts, data, cfg, bcfg, cfg.batch_size) if epochs else init_loss
    # The loss is checked before each update; the state after the last update is checked here.
    check_state(qparams, qconsts, final_loss, cfg, trained=epochs > 0)
    return CalibResult(qparams, qconsts, init_loss, final_loss, epoch_losses, stats)
