"""Calibrating K independent decoder blocks: a Python loop of the per-block jitted step (what
``splitq_jax.pipeline.quantize_blocks`` does) versus one ``jax.vmap``-ed step over the K blocks
stacked (``splitq_jax.parallel.make_vmapped_step``: the same AdamW step, vmapped, jitted once).

With full-precision block inputs (``block_inputs="fp"``) block ``i``'s data depends only on the FP
model, so blocks are independent. Here block ``i`` has random weights (``_common.block_params``,
seed ``i``) and reads the FP output of block ``i - 1``; block 0 reads the synthetic VLM inputs of
``_common.synthetic_vl_inputs``. Statistics (MOCD) and ``init_qblock`` run per block as in the
pipeline (key ``fold_in(PRNGKey(seed), i)``); the MOCD channel *sets* differ per block, their sizes
do not (``mocd.channel_counts`` depends on the width and ratios only), so the states stack.

One worker process per method (fresh process: clean memory numbers), blocks set up once for the
largest K; then for each K (ascending):

* ``compile_s``: ``lower().compile()`` of the per-block step (once per method: every block has one
  shape) and of the vmapped step for that K;
* ``xla_bytes``: temp + argument + output - aliased buffers of each compiled executable;
* ``rss_peak_bytes`` / ``rss_delta_bytes``: current RSS sampled every 5 ms while that mode compiles
  and runs its warm-up step(s), absolute and above the RSS after setup (phases run loop first, then
  vmap K ascending, so each later phase's peak can only include, never hide, what an earlier phase
  left resident);
* ``s_per_step_per_block``: median over ``--steps`` rounds; a round is one step of each of the K
  blocks (loop) or one vmapped step (vmap), the two interleaved and their order alternated round by
  round so that load from other processes hits both alike; ``ratio`` = vmap / loop (< 1: vmap faster),
  also as the median of per-round ratios (``ratio_paired``);
* equality at full size: per-step losses and the final parameters of vmap vs loop (same start).

The machine may be shared: the 1/5/15-minute load averages at start and end are recorded.

Run from the repository root: ``python bench/block_parallel.py [--ks 2,4 --methods splitq,flatquant]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

BENCH = "block_parallel"
MODELS = {"qwen2-0.5b-block": C.QWEN2_05B, "qwen2.5-vl-3b-block": C.QWEN25_VL_3B,
          "tiny": dict(hidden=48, intermediate=96, num_heads=4, num_kv_heads=2)}  # smoke runs


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-0.5b-block", choices=sorted(MODELS))
    ap.add_argument("--samples", type=int, default=4, help="calibration samples per block")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sample")
    ap.add_argument("--batch", type=int, default=2, help="samples per step")
    ap.add_argument("--steps", type=int, default=4, help="timed rounds per K (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per mode after compiling")
    ap.add_argument("--ks", default="2,4", help="comma list of block counts K")
    ap.add_argument("--methods", default="splitq,flatquant")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output JSON (default bench/results/block_parallel-<machine>.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: method of a worker
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--assemble", default=None,
                    help="comma list of worker result files: write the JSON from them instead of running "
                         "workers (a run whose driver was stopped; see --load-start)")
    ap.add_argument("--load-start", default=None, help="with --assemble: the load averages at the run's start (a,b,c)")
    ap.add_argument("--note", default=None, help="free text stored in the run record")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Worker: one method, all K, in a fresh process


def _xla_bytes(compiled) -> int | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes)


def _param_diff(a, b, rtol=2e-5, atol=2e-6) -> dict:
    import jax
    import numpy as np

    n = bad = 0
    worst = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        d = np.abs(x - y)
        n += d.size
        bad += int(np.sum(d > rtol * np.abs(y) + atol))
        worst = max(worst, float(d.max(initial=0.0)))
    return {"elements": n, "beyond_roundoff": bad, "max_abs_diff": worst}


def worker(args) -> dict:
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np

    from calibration_step import RssSampler
    from splitq_jax import calibrate as cal
    from splitq_jax import parallel as par
    from splitq_jax.block import BlockConfig
    from splitq_jax.config import method_config

    method = args.worker
    ks = sorted({int(k) for k in args.ks.split(",")})
    kmax = ks[-1]
    bcfg = BlockConfig(**MODELS[args.model])
    cfg = method_config(method, args.bits, batch_size=args.batch, seed=args.seed)
    bs = min(args.batch, args.samples)
    per_epoch = args.samples // bs
    total_steps = args.warmup + args.steps
    out: dict = {"method": method, "ks": ks, "per_block": [], "per_k": {}}

    # --- setup: the FP stream through kmax random blocks, stats and init per block ---------------
    log(f"[{method}] setup of {kmax} blocks ({args.samples} x {args.tokens} tokens)")
    x, modality, _ = C.synthetic_vl_inputs(args.samples, args.tokens, bcfg.hidden, seed=args.seed + 1)
    cos, sin, mask = C.rope_and_mask(args.samples, args.tokens, bcfg.head_dim)
    x = jnp.asarray(x)
    base_key = jax.random.PRNGKey(args.seed)
    params, datas, stats, inits = [], [], [], []
    for i in range(kmax):
        p = C.block_params(bcfg, seed=args.seed + i)
        d = cal.make_block_data(p, x, cos, sin, mask, modality, bcfg)
        t0 = time.perf_counter()
        st = cal.collect_stats(p, d, cfg, bcfg, batch_size=bs)
        stats_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        qp, qc = cal.init_qblock(jax.random.fold_in(base_key, i), p, st, cfg, bcfg)
        jax.block_until_ready((qp, qc))
        init_s = time.perf_counter() - t0
        params.append(p), datas.append(d), stats.append(st), inits.append((qp, qc))
        out["per_block"].append({
            "block": i, "stats_s": stats_s, "init_s": init_s,
            "input_absmax": float(jnp.max(jnp.abs(d.x))),
            "channels": {g: {"text": len(s.text_idx), "vision": len(s.vision_idx)} for g, s in st.items()},
        })
        x = d.y  # FP stream: the next block reads this block's FP output
    # How different the per-block MOCD splits are (Jaccard overlap with block 0, per group).
    overlap = {}
    for g in bcfg.groups:
        s0 = set(stats[0][g].text_idx.tolist()) | set(stats[0][g].vision_idx.tolist())
        if not s0:
            continue
        overlap[g] = [len(s0 & (set(st[g].text_idx.tolist()) | set(st[g].vision_idx.tolist()))) / len(s0)
                      for st in stats]
    out["split_overlap_with_block0"] = overlap
    out["split_sizes_equal"] = all(
        (len(st[g].text_idx), len(st[g].vision_idx)) == (len(stats[0][g].text_idx), len(stats[0][g].vision_idx))
        for st in stats for g in bcfg.groups)
    del x
    gc.collect()
    rss_base = C.current_rss_bytes()
    out["rss_after_setup_bytes"] = rss_base

    def batch_of(t: int):
        return (t % per_epoch) * bs

    # --- loop: the per-block jitted step (one executable for every block) ------------------------
    opt, step = cal.make_step(cfg, bcfg, total_steps)
    sampler = RssSampler().start()
    t0 = time.perf_counter()
    loop_exec = step.lower(inits[0][0], opt.init(inits[0][0]), inits[0][1], datas[0].batch(0, bs)).compile()
    loop_compile_s = time.perf_counter() - t0
    # warm-up step of one block (the per-K rounds below warm up their own states)
    qp, os_, _ = loop_exec(inits[0][0], opt.init(inits[0][0]), inits[0][1], datas[0].batch(0, bs))
    jax.block_until_ready(qp)
    del qp, os_
    loop_peak = sampler.stop()
    out["loop"] = {"compile_s": loop_compile_s, "xla_bytes": _xla_bytes(loop_exec),
                   "rss_peak_bytes": loop_peak, "rss_delta_bytes": loop_peak - rss_base}
    log(f"[{method}] loop step compiled in {loop_compile_s:.1f}s; rss peak {loop_peak / 2**30:.2f} GiB")

    for k in ks:
        gc.collect()
        sampler = RssSampler().start()
        opt_v, vstep = par.make_vmapped_step(cfg, bcfg, total_steps)
        sp = par.stack_trees([qp for qp, _ in inits[:k]])
        sc = par.stack_trees([qc for _, qc in inits[:k]])
        so = par.stack_trees([opt_v.init(qp) for qp, _ in inits[:k]])
        sd = par.stack_block_data(datas[:k])
        t0 = time.perf_counter()
        vexec = vstep.lower(sp, so, sc, par.batch_stacked(sd, 0, bs)).compile()
        v_compile_s = time.perf_counter() - t0
        loop_state = [(qp, opt.init(qp)) for qp, _ in inits[:k]]
        loop_losses, vm_losses = [], []

        def loop_round(t: int) -> float:
            t0 = time.perf_counter()
            ls = []
            for i in range(k):
                qp, os_, loss = loop_exec(loop_state[i][0], loop_state[i][1], inits[i][1], datas[i].batch(batch_of(t), bs))
                loop_state[i] = (qp, os_)
                ls.append(float(loss))  # the pipeline reads every loss (finite check, callbacks)
            loop_losses.append(ls)
            return time.perf_counter() - t0

        def vmap_round(t: int) -> float:
            nonlocal sp, so
            t0 = time.perf_counter()
            sp, so, losses = vexec(sp, so, sc, par.batch_stacked(sd, batch_of(t), bs))
            vm_losses.append(np.asarray(losses, np.float64).tolist())
            return time.perf_counter() - t0

        for t in range(args.warmup):
            vmap_round(t)
        v_peak = sampler.stop()
        for t in range(args.warmup):
            loop_round(t)
        times = {"loop": [], "vmap": []}
        for r in range(args.steps):
            t = args.warmup + r
            order = ("loop", "vmap") if r % 2 == 0 else ("vmap", "loop")
            for mode in order:
                dt = loop_round(t) if mode == "loop" else vmap_round(t)
                times[mode].append(dt)
            log(f"[{method}] K={k} round {r + 1}/{args.steps}: loop {times['loop'][-1]:.2f}s, "
                f"vmap {times['vmap'][-1]:.2f}s")
        lo, vm = np.asarray(loop_losses), np.asarray(vm_losses)
        loss_rel = float(np.max(np.abs(vm - lo) / np.maximum(np.abs(lo), 1e-30)))
        pdiff = [_param_diff(qv, ql) for qv, (ql, _) in zip(par.unstack_tree(sp, k), loop_state)]
        out["per_k"][k] = {
            "vmap_compile_s": v_compile_s, "vmap_xla_bytes": _xla_bytes(vexec),
            "vmap_rss_peak_bytes": v_peak, "vmap_rss_delta_bytes": v_peak - rss_base,
            "loop_round_s": times["loop"], "vmap_round_s": times["vmap"],
            "loop_s_per_step_per_block": statistics.median(times["loop"]) / k,
            "vmap_s_per_step_per_block": statistics.median(times["vmap"]) / k,
            "ratio": statistics.median(times["vmap"]) / statistics.median(times["loop"]),
            "ratio_paired": statistics.median(v / l_ for v, l_ in zip(times["vmap"], times["loop"])),
            "loss_max_rel_diff": loss_rel, "losses_loop": lo.tolist(), "losses_vmap": vm.tolist(),
            "param_diff": {
                "elements": sum(p["elements"] for p in pdiff),
                "beyond_roundoff": sum(p["beyond_roundoff"] for p in pdiff),
                "max_abs_diff": max(p["max_abs_diff"] for p in pdiff),
                "lr": cfg.lr, "clip_lr": cfg.clip_lr,
            },
        }
        log(f"[{method}] K={k}: vmap compiled in {v_compile_s:.1f}s, loss max rel diff {loss_rel:.1e}, "
            f"params beyond round-off {out['per_k'][k]['param_diff']['beyond_roundoff']}"
            f"/{out['per_k'][k]['param_diff']['elements']} (max |diff| "
            f"{out['per_k'][k]['param_diff']['max_abs_diff']:.1e})")
        vexec = sp = so = sc = sd = loop_state = None  # free before the next K
    out["ru_maxrss_bytes"] = C.peak_rss_bytes()
    return out


# ---------------------------------------------------------------------------------------------
# Driver


def run_worker(method: str, args, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="block_parallel_") as tmp:
        path = Path(tmp) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", method, "--worker-out", str(path)]
        subprocess.run(cmd, check=True)
        return json.loads(path.read_text())


def records_of(res: dict, common: dict) -> list[dict]:
    method = res["method"]
    recs = []
    base = dict(common, method=method)
    lp = res["loop"]
    for k_str, r in res["per_k"].items():
        k = int(k_str)
        kb = dict(base, k=k)
        for mode, val in (("loop", r["loop_s_per_step_per_block"]), ("vmap", r["vmap_s_per_step_per_block"])):
            recs.append(dict(kb, mode=mode, metric="s_per_step_per_block", value=val, unit="s"))
        recs.append(dict(kb, mode="loop", metric="round_times_s", value=[round(v, 4) for v in r["loop_round_s"]],
                         unit="s", note="one step of each of the K blocks"))
        recs.append(dict(kb, mode="vmap", metric="round_times_s", value=[round(v, 4) for v in r["vmap_round_s"]],
                         unit="s", note="one vmapped step of K blocks"))
        recs.append(dict(kb, mode="vmap/loop", metric="ratio", value=r["ratio"],
                         note="median vmap round / median loop round (< 1: vmap faster)"))
        recs.append(dict(kb, mode="vmap/loop", metric="ratio_paired", value=r["ratio_paired"],
                         note="median of per-round ratios (rounds interleaved, order alternated)"))
        recs.append(dict(kb, mode="loop", metric="compile_s", value=lp["compile_s"], unit="s",
                         note="per-block step, compiled once for all blocks (and all K)"))
        recs.append(dict(kb, mode="vmap", metric="compile_s", value=r["vmap_compile_s"], unit="s"))
        recs.append(dict(kb, mode="loop", metric="xla_bytes", value=lp["xla_bytes"], unit="bytes",
                         note="one block's step executable: temp + args + outputs - aliased"))
        recs.append(dict(kb, mode="vmap", metric="xla_bytes", value=r["vmap_xla_bytes"], unit="bytes"))
        recs.append(dict(kb, mode="loop", metric="rss_peak_bytes", value=lp["rss_peak_bytes"], unit="bytes",
                         note="max current RSS while compiling + warm-up (all K blocks' state resident)"))
        recs.append(dict(kb, mode="vmap", metric="rss_peak_bytes", value=r["vmap_rss_peak_bytes"], unit="bytes",
                         note="max current RSS while stacking, compiling + warm-up"))
        recs.append(dict(kb, mode="loop", metric="rss_delta_bytes", value=lp["rss_delta_bytes"], unit="bytes",
                         note="rss_peak_bytes minus RSS after setup"))
        recs.append(dict(kb, mode="vmap", metric="rss_delta_bytes", value=r["vmap_rss_delta_bytes"], unit="bytes",
                         note="rss_peak_bytes minus RSS after setup (includes the stacked copy of the K states)"))
        recs.append(dict(kb, mode="vmap/loop", metric="loss_max_rel_diff", value=r["loss_max_rel_diff"],
                         note="max over steps and blocks of |loss_vmap - loss_loop| / |loss_loop|"))
        pd = r["param_diff"]
        recs.append(dict(kb, mode="vmap/loop", metric="params_beyond_roundoff", value=pd["beyond_roundoff"],
                         elements=pd["elements"], max_abs_diff=pd["max_abs_diff"], lr=pd["lr"], clip_lr=pd["clip_lr"],
                         note="final parameter elements with |diff| > 2e-5 |p| + 2e-6 (AdamW amplifies the "
                              "round-off of gradients near its eps)"))
        recs.append(dict(kb, mode="both", metric="losses", value={"loop": r["losses_loop"], "vmap": r["losses_vmap"]}))
    for b in res["per_block"]:
        recs.append(dict(base, mode="setup", metric="block_setup", block=b["block"], value=b["stats_s"] + b["init_s"],
                         unit="s", stats_s=b["stats_s"], init_s=b["init_s"], input_absmax=b["input_absmax"],
                         channels=b["channels"], note="collect_stats + init_qblock: per block, host, in both modes"))
    recs.append(dict(base, mode="setup", metric="split_sizes_equal", value=res["split_sizes_equal"],
                     split_overlap_with_block0=res["split_overlap_with_block0"],
                     note="MOCD channel counts equal across blocks (so states stack); the sets differ: "
                          "Jaccard-style overlap |S_i & S_0| / |S_0| per group"))
    recs.append(dict(base, mode="process", metric="ru_maxrss_bytes", value=res["ru_maxrss_bytes"], unit="bytes",
                     note="peak RSS of the worker process (setup + loop + every K)"))
    return recs


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        res = worker(args)
        Path(args.worker_out).write_text(json.dumps(res))
        return
    t_start = time.perf_counter()
    load_start = loadavg()
    machine = C.machine_name()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.assemble:
        results = [json.loads(Path(p).read_text()) for p in args.assemble.split(",")]
        methods = [r["method"] for r in results]
        if args.load_start:
            load_start = [float(v) for v in args.load_start.split(",")]
    else:
        log(f"{BENCH}: {args.model}, K in {args.ks}, {args.samples} x {args.tokens} tokens, batch {args.batch}, "
            f"{args.bits}, methods {methods}, on {machine}; load {load_start}")
        results = [run_worker(m, args, argv) for m in methods]
    load_end = loadavg()
    common = dict(bench=BENCH, model=args.model, bits=args.bits, machine=machine, samples=args.samples,
                  tokens=args.tokens, batch=args.batch, steps=args.steps, warmup=args.warmup)
    records = [r for res in results for r in records_of(res, common)]
    wall = time.perf_counter() - t_start
    records.append(C.run_record(
        BENCH, machine, wall_s=round(wall, 1), args=vars(args), loadavg_start=load_start, loadavg_end=load_end,
        shared_machine=True, assembled_from_workers=bool(args.assemble), run_note=args.note,
        note=("2-core machine shared with other jobs during the run (load averages 1/5/15 min at start and "
              "end); loop and vmap rounds are interleaved with alternating order, so load hits both alike")))
    out = Path(args.out) if args.out else C.RESULTS / f"{BENCH}-{machine}.json"
    C.write_json_atomic(out, records)

    print(f"\n{args.model}, {args.samples} x {args.tokens} tokens, batch {args.batch}, {args.bits}, {machine} "
          f"(load {load_start[0]:.1f} -> {load_end[0]:.1f})")
    print(f"{'method':<10}{'K':>3}{'loop s/step/blk':>17}{'vmap s/step/blk':>17}{'ratio':>7}{'paired':>8}"
          f"{'loop comp s':>13}{'vmap comp s':>13}{'loop rssΔ GiB':>15}{'vmap rssΔ GiB':>15}"
          f"{'loop xla GiB':>14}{'vmap xla GiB':>14}{'loss rel':>10}{'params>ro':>11}")
    for res in results:
        for k_str, r in res["per_k"].items():
            lp = res["loop"]
            pd = r["param_diff"]
            print(f"{res['method']:<10}{int(k_str):>3}{r['loop_s_per_step_per_block']:>17.3f}"
                  f"{r['vmap_s_per_step_per_block']:>17.3f}{r['ratio']:>7.2f}{r['ratio_paired']:>8.2f}"
                  f"{lp['compile_s']:>13.1f}{r['vmap_compile_s']:>13.1f}{lp['rss_delta_bytes'] / 2**30:>15.2f}"
                  f"{r['vmap_rss_delta_bytes'] / 2**30:>15.2f}{(lp['xla_bytes'] or 0) / 2**30:>14.2f}"
                  f"{(r['vmap_xla_bytes'] or 0) / 2**30:>14.2f}{r['loss_max_rel_diff']:>10.1e}"
                  f"{pd['beyond_roundoff']:>6}/{pd['elements']}")
        print(f"{res['method']:<10} MOCD split sizes equal across blocks: {res['split_sizes_equal']}; "
              f"worker peak RSS {res['ru_maxrss_bytes'] / 2**30:.2f} GiB")
    print(f"wrote {out} ({wall:.0f}s)")


if __name__ == "__main__":
    main()
