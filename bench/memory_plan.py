"""Per-device memory of calibrating one decoder block, planned from shapes and checked by XLA.

No weights are read. For each model's block shape, method and device count the benchmark builds
the block's calibration state at full size (zeros; the low-rank branches' SVD replaced by zeros of
its shape: values do not change sizes), then lowers and compiles the jitted calibration program
with the batch split over a ``("data",)`` mesh of forced host devices (the data-parallel path of
:mod:`splitq_jax.sharding`), and reads the compiled program's ``memory_analysis()``: per-device
argument, output, temporary and aliased bytes. One call's peak per device is
``arguments + outputs + temporaries - aliased``.

* flatquant, splitq: the training step (``calibrate.make_step``: forward, backward, AdamW).
* gptq: the capture of the group inputs (the full-precision block over a batch) plus one Hessian
  update, compiled; plus the Hessians of the block's four group inputs, held replicated
  (``4 d_in^2`` bytes each), and the column solver's workspace for the widest linear (``W``,
  its quantized copy and error, ``H`` and its inverse), counted from shapes (the solver runs
  eagerly column block by column block, so there is no single program to compile).

The calibration cache (every sample's block input and target, masks, rotary tables) stays on the
host under data parallelism, and each batch is streamed to the devices, so the device peak does
not grow with the calibration set. ``max_samples_*`` answers the other question: if the cache
were held on the devices, split over them, how many samples would fit a 24, 80 or 141 GB device
next to the step's peak.

Run from the repository root (one process; sets 8 host devices itself)::

    python bench/memory_plan.py [--tokens 2048] [--models ...] [--methods ...] [--devices 1 4 8]

Writes ``bench/results/memory_plan-<machine>.json`` and prints the table for the README.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from splitq_jax import calibrate as cal  # noqa: E402
from splitq_jax import sharding  # noqa: E402
from splitq_jax.block import BlockConfig, init_block_params  # noqa: E402
from splitq_jax.calib import collectors as col  # noqa: E402
from splitq_jax.calib.stats import GroupStats, group_inputs_jit  # noqa: E402
from splitq_jax.config import method_config  # noqa: E402
from splitq_jax.methods.splitq import mocd  # noqa: E402
from splitq_jax.methods.splitq import split_linear as sl  # noqa: E402

GB = 1e9
BUDGETS_GB = (24, 80, 141)


def block_configs() -> dict[str, BlockConfig]:
    from splitq_jax.models import llava, qwen2_5_vl

    return {
        "qwen2.5-vl-3b": BlockConfig.from_decoder(qwen2_5_vl.get_config("qwen2.5-vl-3b").text),
        "qwen2.5-vl-7b": BlockConfig.from_decoder(qwen2_5_vl.get_config("qwen2.5-vl-7b").text),
        "llava-1.5-13b": BlockConfig.from_decoder(llava.get_config("llava-1.5-13b").text),
        # Qwen2.5-VL-72B's language decoder: hidden 8192, intermediate 29568, 64 query / 8 KV heads
        "qwen2.5-vl-72b-shape": BlockConfig(hidden=8192, intermediate=29568, num_heads=64, num_kv_heads=8,
                                            qkv_bias=True),
    }


def zeros_like_tree(tree):
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def abstract(tree, spec):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=spec), tree)


def batch_abstract(bcfg: BlockConfig, b: int, n: int, mesh) -> cal.BlockData:
    spec = NamedSharding(mesh, P(sharding.AXIS))
    f32 = jnp.float32

    def s(shape, dtype=f32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=spec)

    return cal.BlockData(x=s((b, n, bcfg.hidden)), y=s((b, n, bcfg.hidden)), cos=s((b, n, bcfg.head_dim)),
                         sin=s((b, n, bcfg.head_dim)), mask=s((b, n, n), jnp.bool_), modality=s((b, n), jnp.int32),
                         weight=None, x_fp=None)


def cache_bytes_per_sample(bcfg: BlockConfig, n: int) -> int:
    """Host calibration cache of one sample for one block: input and target (float32), the
    attention mask (bool), rotary tables (float32) and modality codes (int32)."""
    return 2 * n * bcfg.hidden * 4 + n * n + 2 * n * bcfg.head_dim * 4 + n * 4


def synthetic_stats(cfg, bcfg: BlockConfig, params) -> dict[str, GroupStats]:
    """Channel splits of the sizes MOCD picks (the first channels; which ones does not matter)."""
    wanted, split = cal.engine_statistics(cfg, bcfg)
    stats = {}
    for g, names in bcfg.groups.items():
        d = int(params[names[0]]["w"].shape[1])
        st = GroupStats(absmax=jnp.ones((d,), jnp.float32) if "absmax" in wanted.get(g, ()) else None)
        if g in split:
            k_t, k_v = mocd.channel_counts(d, split[g].text_ratio, split[g].vision_ratio)
            st.text_idx = np.arange(k_t, dtype=np.int32)
            st.vision_idx = np.arange(k_t, k_t + k_v, dtype=np.int32)
        stats[g] = st
    return stats


def _zero_svd(w_rows, r, seed=0):
    d_out, d = np.shape(w_rows)
    return np.zeros((d, r), np.float32), np.zeros((r, d_out), np.float32)


def memory_of(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def plan_transform(method: str, bcfg: BlockConfig, params, tokens: int, mesh, batch: int) -> dict:
    cfg = cal.as_engine(method_config(method, "w4a4", batch_size=batch))
    real_svd, sl._svd_top = sl._svd_top, _zero_svd
    try:
        qp, qc = cal.init_qblock(jax.random.PRNGKey(0), params, synthetic_stats(cfg, bcfg, params), cfg, bcfg)
    finally:
        sl._svd_top = real_svd
    opt, step = cal.make_step(cfg, bcfg, 1000)
    rep = NamedSharding(mesh, P())
    aq, ac = abstract(qp, rep), abstract(qc, rep)
    ao = abstract(jax.eval_shape(opt.init, aq), rep)
    del qp, qc
    compiled = step.lower(aq, ao, ac, batch_abstract(bcfg, batch, tokens, mesh)).compile()
    mem = memory_of(compiled)
    mem["learned_params"] = int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(aq)))
    return mem


def plan_gptq(bcfg: BlockConfig, params, tokens: int, mesh, batch: int) -> dict:
    rep = NamedSharding(mesh, P())
    ap = abstract(params, rep)
    data = batch_abstract(bcfg, batch, tokens, mesh)
    capture = group_inputs_jit(bcfg).lower(ap, data.x, data.cos, data.sin, data.mask).compile()
    mem = memory_of(capture)
    # one Hessian update on the widest group input (down_proj's), tokens split over the devices
    d_max = max(bcfg.hidden, bcfg.intermediate)
    tok = jax.ShapeDtypeStruct((batch * tokens, d_max), jnp.float32, sharding=NamedSharding(mesh, P(sharding.AXIS)))
    tvec = jax.ShapeDtypeStruct((batch * tokens,), jnp.float32, sharding=NamedSharding(mesh, P(sharding.AXIS)))
    mvec = jax.ShapeDtypeStruct((batch * tokens,), jnp.int32, sharding=NamedSharding(mesh, P(sharding.AXIS)))
    state = abstract((col.get_collector("hessian").init(d_max),), rep)
    upd = col._update_jit(("hessian",)).lower(state, col.Tokens(tok, mvec, tvec)).compile()
    um = memory_of(upd)
    widths = {g: int(params[names[0]]["w"].shape[1]) for g, names in bcfg.groups.items()}
    hessians = sum(4 * d * d for d in widths.values())
    widest = max(((int(params[n]["w"].shape[0]), int(params[n]["w"].shape[1])) for names in bcfg.groups.values()
                  for n in names), key=lambda s: s[0] * s[1])
    solver = 3 * 4 * widest[0] * widest[1] + 2 * 4 * widest[1] ** 2  # W, Q, Err; H, H^-1
    mem["hessian_update_peak"] = um["peak"]
    mem["hessians"] = hessians
    mem["solver"] = solver
    mem["peak"] = max(mem["peak"], um["peak"]) + hessians + solver
    return mem


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per sample (default 2048, the length cap)")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=["flatquant", "splitq", "gptq"])
    ap.add_argument("--devices", nargs="*", type=int, default=[1, 4, 8])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    machine = C.machine_name()
    out = Path(args.out) if args.out else C.RESULTS / f"memory_plan-{machine}.json"
    configs = block_configs()
    models = args.models or list(configs)
    records = [C.run_record("memory_plan", machine, tokens=args.tokens, devices=args.devices)]
    rows = []
    for model in models:
        bcfg = configs[model]
        params = zeros_like_tree(jax.eval_shape(lambda k: init_block_params(k, bcfg), jax.random.PRNGKey(0)))
        per_sample = cache_bytes_per_sample(bcfg, args.tokens)
        for method in args.methods:
            for n in args.devices:
                mesh = sharding.data_mesh(n)
                batch = max(4, n)  # the methods' default batch of 4, at least one sample per device
                t0 = time.time()
                mem = (plan_gptq(bcfg, params, args.tokens, mesh, batch) if method == "gptq"
                       else plan_transform(method, bcfg, params, args.tokens, mesh, batch))
                row = dict(model=model, method=method, devices=n, batch=batch, tokens=args.tokens,
                           cache_bytes_per_sample=per_sample, compile_s=round(time.time() - t0, 1), **mem)
                for budget in BUDGETS_GB:
                    free = budget * GB - mem["peak"]
                    row[f"max_samples_{budget}gb"] = int(max(free, 0) * n // per_sample)
                rows.append(row)
                print(f"{model:22s} {method:9s} {n} dev: peak {mem['peak'] / GB:7.2f} GB/device "
                      f"(batch {batch} x {args.tokens}); cache {per_sample / 1e6:.0f} MB/sample; "
                      + ", ".join(f"{b} GB: {row[f'max_samples_{b}gb']}" for b in BUDGETS_GB), flush=True)
                for metric in ("peak", "argument", "temp"):
                    records.append(dict(bench="memory_plan", model=model, method=method, bits="w4a4", devices=n,
                                        batch=batch, tokens=args.tokens, metric=f"{metric}_bytes_per_device",
                                        value=mem[metric], machine=machine))
                for budget in BUDGETS_GB:
                    records.append(dict(bench="memory_plan", model=model, method=method, bits="w4a4", devices=n,
                                        batch=batch, tokens=args.tokens, metric=f"max_samples_cache_on_{budget}gb",
                                        value=row[f"max_samples_{budget}gb"], machine=machine))
                C.write_json_atomic(out, records)  # every finished cell is kept
                gc.collect()
                jax.clear_caches()
        del params
    print(f"wrote {out}")
    print("\n| model | method | devices | peak GB/device | max samples, cache on 24 / 80 / 141 GB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['devices']} | {r['peak'] / GB:.2f} | "
              + " / ".join(str(r[f"max_samples_{b}gb"]) for b in BUDGETS_GB) + " |")


if __name__ == "__main__":
    main()
