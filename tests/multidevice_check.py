"""Data-parallel calibration against one device, in a process of its own with forced host devices.

Run by ``tests/test_sharding.py`` as ``XLA_FLAGS=--xla_force_host_platform_device_count=4 python
tests/multidevice_check.py OUT.json`` (the device count is fixed when JAX starts, so it cannot be
changed inside the test process; and collectives must not share a process with other tests).
Writes the measured differences as JSON; the test holds the assertions.

Cases, on one tiny block with vision and text outlier channels and a padded sample:
* ``fit``: flatquant and splitq ``fit_block`` on 1 device vs 4 (one sample per device) vs 3 (a
  batch of 4 padded with masked samples): channel split, losses, learned parameters;
* ``stats``: the statistics pass (absmax, Hessian, MOCD's split) for every (devices, micro-batch)
  pair of {1, 2, 3, 4} x {2, 4};
* ``grad``: the gradient the calibration step applies, 1 device vs 4, and, as the control that
  the comparison can fail, the classic mistake: per-device gradients of the local loss, summed.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from splitq_jax import calibrate as cal
from splitq_jax import sharding
from splitq_jax.block import BlockConfig, causal_mask, init_block_params, rope_1d
from splitq_jax.calib.stats import collect_group_stats
from splitq_jax.config import method_config

BCFG = BlockConfig(hidden=48, intermediate=96, num_heads=4, num_kv_heads=2)
S, N, N_VIS = 8, 16, 6


def block_data():
    params = init_block_params(jax.random.PRNGKey(0), BCFG, scale=0.15)
    x = jax.random.normal(jax.random.PRNGKey(1), (S, N, BCFG.hidden))
    is_vis = jnp.arange(N) < N_VIS
    gain = jnp.ones((N, BCFG.hidden)).at[:, 12].set(jnp.where(is_vis, 25.0, 1.0))
    gain = gain.at[:, 5].set(jnp.where(is_vis, 1.0, 15.0))
    modality = jnp.where(is_vis, 2, 1)[None].repeat(S, 0)
    valid = jnp.ones((S, N), bool).at[-1, :3].set(False)  # one left-padded sample
    modality = jnp.where(valid, modality, 0)
    cos, sin = rope_1d(jnp.cumsum(valid, axis=1) - 1, BCFG.head_dim)
    return params, cal.make_block_data(params, x * gain, cos, sin, causal_mask(valid), modality, BCFG)


def rel(a, b) -> float:
    """max |a - b| over max |b| across all leaves of two trees."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(la, lb))
    den = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in lb)
    return num / max(den, 1e-30)


def split_of(stats) -> dict:
    return {g: [np.asarray(st.text_idx).tolist(), np.asarray(st.vision_idx).tolist()] for g, st in stats.items()}


def fit_case(method: str, params, data, counts=(4, 3)) -> dict:
    cfg = method_config(method, "w4a4", epochs=2, batch_size=4)
    runs = {}
    for n in (1, *counts):
        with sharding.data_parallel(n):
            r = cal.fit_block(params, data, cfg, BCFG)
        runs[n] = r
    one = runs[1]
    out = {}
    for n in counts:
        r = runs[n]
        out[str(n)] = {
            "same_split": split_of(r.stats) == split_of(one.stats),
            "init_loss_rel": abs(r.init_loss - one.init_loss) / abs(one.init_loss),
            "final_loss_rel": abs(r.final_loss - one.final_loss) / abs(one.final_loss),
            "epoch_losses_rel": max(abs(a - b) / abs(b) for a, b in zip(r.epoch_losses, one.epoch_losses)),
            "params_rel": rel(r.qparams, one.qparams),
            "trained": one.final_loss < one.init_loss,
            # the learned state came out of steps that ran on the n-device mesh
            "state_devices": len(jax.tree_util.tree_leaves(r.qparams)[0].sharding.device_set),
        }
    out["split_nonempty"] = any(len(t) + len(v) for t, v in split_of(one.stats).values())
    return out


def stats_case(params, data, pairs=((1, 4), (1, 2), (2, 2), (3, 4), (4, 4), (4, 2))) -> dict:
    """The first (devices, micro-batch) pair is the reference."""
    wanted = {g: ("absmax", "hessian") for g in BCFG.groups}
    _, split = cal.engine_statistics(method_config("splitq", "w4a4"), BCFG)
    ref = None
    out = {}
    for n, bs in pairs:
        with sharding.data_parallel(n):
            st = collect_group_stats(params, data, BCFG, wanted, split, batch_size=bs)
        got = {"absmax": {g: np.asarray(s.collected["absmax"].absmax) for g, s in st.items()},
               "hessian": {g: np.asarray(s.collected["hessian"].matrix) for g, s in st.items()},
               "count": {g: float(s.collected["hessian"].weight_sum) for g, s in st.items()},
               "split": split_of(st)}
        if ref is None:
            ref = got
            continue
        out[f"{n}x{bs}"] = {
            # the block's matmuls may round differently for another batch shape: not bit-exact
            "absmax_rel": rel(got["absmax"], ref["absmax"]),
            "hessian_rel": rel(got["hessian"], ref["hessian"]),
            "count_equal": got["count"] == ref["count"],
            "same_split": got["split"] == ref["split"],
        }
    return out


def grad_case(method: str, params, data) -> dict:
    # without FlatQuant's loss normalisation the step's gradient is the plain gradient of the loss,
    # which the per-device control below also differentiates
    cfg = method_config(method, "w4a4", epochs=1, batch_size=4, normalize_loss=False)
    stats = cal.collect_stats(params, data, cfg, BCFG)
    qp, qc = cal.init_qblock(jax.random.PRNGKey(0), params, stats, cfg, BCFG)
    batch = data.batch(0, 4)
    grad = cal.block_gradient(cfg, BCFG)
    loss1, g1 = grad(qp, qc, batch)
    with sharding.data_parallel(4) as mesh:
        sb = sharding.shard_batch(batch)
        rp = sharding.replicate((qp, qc))
        loss4, g4 = grad(*rp, sb)

        # The mistake a hand-written data-parallel step makes: each device differentiates the loss
        # of its own samples and the gradients are summed (no division by the device count).
        def local(qp_, qc_, b):
            return jax.grad(lambda p: cal.loss_fn(p, qc_, b, cfg, BCFG))(qp_)

        summed = jax.shard_map(lambda p, c, b: jax.lax.psum(local(p, c, b), sharding.AXIS), mesh=mesh,
                               in_specs=(P(), P(), P(sharding.AXIS)), out_specs=P(), check_vma=False)
        wrong = jax.jit(summed)(*rp, sb)
    return {
        "devices": len(sb.x.sharding.device_set),
        "grad_devices": len(jax.tree_util.tree_leaves(g4)[0].sharding.device_set),
        "loss_rel": abs(float(loss4) - float(loss1)) / abs(float(loss1)),
        "grad_rel": rel(g4, g1),
        "grad_norm": float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(g1)))),
        "wrong_rel": rel(wrong, g1),
    }


def hessian_case(method: str, params, data) -> dict:
    """A Hessian method's block (statistics, column solve, losses) on 1 device vs 4."""
    from splitq_jax import methods

    m, cfg = methods.get_method(method), methods.get_config(method, "w4a8", batch_size=4)
    with sharding.data_parallel(1):
        one = m.calibrate_block(params, data, cfg, BCFG)
    with sharding.data_parallel(4):
        four = m.calibrate_block(params, data, cfg, BCFG)
    w1 = [np.asarray(s.weight) for g in sorted(one.qparams) for _, s in sorted(one.qparams[g].items())]
    w4 = [np.asarray(s.weight) for g in sorted(four.qparams) for _, s in sorted(four.qparams[g].items())]
    same = sum(int(np.sum(a == b)) for a, b in zip(w1, w4)) / sum(a.size for a in w1)
    return {"init_loss_rel": abs(four.init_loss - one.init_loss) / abs(one.init_loss),
            "final_loss_rel": abs(four.final_loss - one.final_loss) / abs(one.final_loss),
            # a Hessian that differs in its last bits may flip a rounding decision here and there
            "weights_identical_fraction": same,
            "weights_rel": rel(w4, w1)}


def main(out_path: str, full: bool) -> None:
    """``full``: every case (slow); else the gradient, a subset of the statistics pairs and
    flatquant's fit on 4 devices (the fast suite's share)."""
    assert jax.device_count() >= 4, f"needs 4 devices, found {jax.device_count()}"
    params, data = block_data()
    result: dict = {"device_count": jax.device_count(), "seconds": {}}
    cases = {"grad": lambda: {m: grad_case(m, params, data) for m in (("flatquant", "splitq") if full else ("flatquant",))},
             "stats": lambda: stats_case(params, data) if full else stats_case(params, data, ((1, 4), (4, 4), (3, 4))),
             "fit": lambda: ({m: fit_case(m, params, data) for m in ("flatquant", "splitq")} if full
                             else {"flatquant": fit_case("flatquant", params, data, counts=(4,))}),
             "hessian": lambda: {m: hessian_case(m, params, data) for m in (("gptq", "gptaq") if full else ("gptq",))}}
    for name, run in cases.items():
        t0 = time.time()
        result[name] = run()
        result["seconds"][name] = round(time.time() - t0, 1)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], full="--full" in sys.argv[2:])
