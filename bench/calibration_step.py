"""Cost of one jitted calibration step (``splitq_jax.calibrate.make_step``) on one decoder block.

Default: one Qwen2.5-VL-3B-sized language block (hidden 2048, intermediate 11008, 16 heads / 2 KV
heads, head_dim 128, qkv bias) on a batch of 4 sequences x 512 tokens, about half of each sequence
a contiguous span of vision tokens (the synthetic generator of ``bench/_common.py``), w4a4.

Per method (default flatquant and splitq), measured side by side in one process:

* ``compile_s``: ``jit(step).lower(...).compile()`` wall time (no persistent compilation cache);
* ``step_s``: median wall time of ``--steps`` steps after ``--warmup`` warm-up steps, the methods
  *interleaved* step by step so that load from other processes hits both alike;
* ``xla_bytes``: temp + argument + output buffers of the compiled step (``memory_analysis``);
* ``xla_flops``, ``xla_bytes_accessed``: XLA's static cost analysis of the compiled step
  (load-independent, so component costs can be compared even when wall times are noisy);
* ``rss_delta_bytes``: host peak RSS while compiling and running that method minus the RSS before
  it (sampled every 5 ms by a thread; on CPU this is where the step's buffers live);
* ``device_peak_bytes``: ``memory_stats()["peak_bytes_in_use"]`` after the method (GPU; cumulative
  over the process, so only the first method's value is that method's alone);
* ``stats_s``, ``init_s``: the one-off ``collect_stats`` (forward pass + channel selection) and
  ``init_qblock`` (transforms, SVD of every weight for CWS/MAC), not part of a step;
* ``step_ratio``: splitq / flatquant median step time, and ``step_ratio_paired``: the median of
  the per-step ratios of back-to-back steps (robust to load drift; goal <= 1.3).

``init_qblock`` computes a full SVD of every (main-channel) weight for CWS/MAC; that SVD is a pure
function of the weight, so the benchmark memoises it by content: the first decomposition of a
weight is timed as usual, later ones (profile variants with the same channel split) are reused
(``svd_reused`` counts them and their ``init_s`` is correspondingly smaller). Step times are
unaffected.

With ``--profile auto`` (default) and a ratio above 1.3, or ``--profile always``, splitq variants
with one component switched off at a time (``cws=False``, ``mac=False``, ``selector="none"``:
no channel split and no outlier groups, but ``main_path`` unchanged) are timed the same way, so the
cost of each component is the difference to full splitq.

Run from the repository root: ``python bench/calibration_step.py [--tokens 512 --batch 4 ...]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from splitq_jax import calibrate as cal  # noqa: E402
from splitq_jax.block import BlockConfig  # noqa: E402
from splitq_jax.config import method_config  # noqa: E402

BENCH = "calibration_step"
MODELS = {"qwen2.5-vl-3b-block": C.QWEN25_VL_3B, "qwen2-0.5b-block": C.QWEN2_05B}
VARIANTS = {  # profiling: splitq with one component off
    "splitq-no_cws": dict(cws=False),
    "splitq-no_mac": dict(mac=False),
    "splitq-no_split": dict(selector="none"),
}


class RssSampler:
    """Max current RSS seen by a background thread between ``start`` and ``stop``."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.peak = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def start(self) -> "RssSampler":
        self.peak = C.current_rss_bytes()
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, C.current_rss_bytes())
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop.set()
        assert self._t is not None
        self._t.join()
        self.peak = max(self.peak, C.current_rss_bytes())
        return self.peak


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-vl-3b-block", choices=sorted(MODELS))
    ap.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per method after compiling")
    ap.add_argument("--methods", default="flatquant,splitq",
                    help="comma list of methods (rtn, smoothquant, flatquant, splitq) and/or profile "
                         f"variants ({', '.join(VARIANTS)})")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--profile", default="auto", choices=("auto", "always", "never"),
                    help="time splitq with cws / mac / the split switched off one at a time "
                         "(auto: only if splitq/flatquant > --goal)")
    ap.add_argument("--profile-steps", type=int, default=3, help="timed steps per profile variant")
    ap.add_argument("--goal", type=float, default=1.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output JSON (default bench/results/calibration_step-<machine>.json)")
    return ap.parse_args(argv)


def config_of(name: str, bits: str):
    if name in VARIANTS:
        return method_config("splitq", bits, **VARIANTS[name])
    return method_config(name, bits)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prepare(name, bits, block_params, data, bcfg, total_steps=1000):
    """Stats, init, compile; returns a dict with the compiled step and its state."""
    cfg = config_of(name, bits)
    t0 = time.perf_counter()
    stats = cal.collect_stats(block_params, data, cfg, bcfg, batch_size=data.x.shape[0])
    stats_s = time.perf_counter() - t0
    from splitq_jax.methods.splitq import split_linear as sl

    hits0 = getattr(sl._svd_top, "hits", 0)
    t0 = time.perf_counter()
    qparams, qconsts = cal.init_qblock(jax.random.PRNGKey(0), block_params, stats, cfg, bcfg)
    init_s = time.perf_counter() - t0
    svd_reused = getattr(sl._svd_top, "hits", 0) - hits0
    opt, step = cal.make_step(cfg, bcfg, total_steps)
    opt_state = opt.init(qparams)
    t0 = time.perf_counter()
    compiled = step.lower(qparams, opt_state, qconsts, data).compile()
    compile_s = time.perf_counter() - t0
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops, bytes_accessed = float(ca.get("flops", float("nan"))), float(ca.get("bytes accessed", float("nan")))
    except Exception:  # noqa: BLE001 - not every backend implements it
        flops = bytes_accessed = None
    mem = compiled.memory_analysis()
    # XLA:CPU reports peak_memory_in_bytes far below the temp buffers; temp + arguments + outputs
    # - aliased is the allocation of one call.
    xla_bytes = None
    if mem is not None:
        xla_bytes = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(qparams))
    return dict(name=name, cfg=cfg, compiled=compiled, state=[qparams, opt_state], qconsts=qconsts,
                stats_s=stats_s, init_s=init_s, svd_reused=svd_reused, xla_flops=flops,
                xla_bytes_accessed=bytes_accessed, compile_s=compile_s, xla_bytes=xla_bytes, n_params=int(n_params),
                times=[], losses=[])


def run_step(m, data) -> float:
    t0 = time.perf_counter()
    qparams, opt_state, loss = m["compiled"](m["state"][0], m["state"][1], m["qconsts"], data)
    loss.block_until_ready()
    dt = time.perf_counter() - t0
    m["state"] = [qparams, opt_state]
    m["losses"].append(float(loss))
    return dt


def prepare_all(names, args, block_params, data, bcfg):
    """Stats, init and compile each method in turn, tracking the memory each one adds."""
    ms = []
    for name in names:
        gc.collect()
        rss0 = C.current_rss_bytes()
        sampler = RssSampler().start()
        m = prepare(name, args.bits, block_params, data, bcfg)
        for _ in range(args.warmup):
            run_step(m, data)
        m["rss_delta_bytes"] = sampler.stop() - rss0
        m["device_peak_bytes"] = C.device_peak_bytes()
        log(f"{name}: stats {m['stats_s']:.1f}s, init {m['init_s']:.1f}s, compile {m['compile_s']:.1f}s, "
            f"xla buffers {(m['xla_bytes'] or 0) / 2**30:.2f} GiB, rss delta {m['rss_delta_bytes'] / 2**30:.2f} GiB")
        ms.append(m)
    return ms


def time_interleaved(ms, data, n_steps: int) -> dict[str, dict]:
    """``n_steps`` steps of every method, interleaved; returns ``{name: {"times", "step_s"}}``."""
    res = {m["name"]: {"times": []} for m in ms}
    for i in range(n_steps):
        for m in ms:
            dt = run_step(m, data)
            res[m["name"]]["times"].append(dt)
            log(f"  step {i + 1}/{n_steps} {m['name']}: {dt:.2f}s (loss {m['losses'][-1]:.4g})")
    for r in res.values():
        r["step_s"] = statistics.median(r["times"])
    return res


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of ``a[i] / b[i]``: steps i of two methods ran back to back, so a load change
    between steps cancels in each ratio."""
    return statistics.median(x / y for x, y in zip(a, b))


class SvdMemo:
    """Memoises ``split_linear._svd_top`` by the matrix's bytes (profile phase only).

    ``_svd_top`` is a pure function of ``(w, r)`` and computes the full SVD whatever ``r``; the
    profile variants re-initialise the same weights, and at the 3B size each initialisation spends
    minutes in these SVDs on 2 cores. Results are identical to uncached calls (the top-``r``
    slice of the same decomposition); only the profile variants' ``init_s`` is affected.
    """

    def __init__(self, fn):
        self.fn, self.cache, self.hits = fn, {}, 0

    def __call__(self, w, r):
        import hashlib

        import numpy as np

        a = np.ascontiguousarray(np.asarray(w))
        key = (a.shape, a.dtype.str, hashlib.sha1(a.tobytes()).hexdigest())
        if key in self.cache and self.cache[key][0].shape[1] >= r:
            self.hits += 1
            u, l2 = self.cache[key]
            return u[:, :r], l2[:r]
        u, l2 = self.fn(w, r)
        self.cache[key] = (u, l2)
        return u, l2


def summary(m, timing) -> dict:
    keep = ("name", "stats_s", "init_s", "svd_reused", "xla_flops", "xla_bytes_accessed", "compile_s", "xla_bytes", "rss_delta_bytes", "device_peak_bytes", "n_params")
    return dict({k: m.get(k) for k in keep}, **timing)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    machine = C.machine_name()
    bcfg = BlockConfig(**MODELS[args.model])
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    log(f"{BENCH}: {args.model} {bcfg}, batch {args.batch} x {args.tokens} tokens, {args.bits}, "
        f"methods {names}, on {machine}")

    block_params = C.block_params(bcfg, seed=args.seed)
    x, modality, _ = C.synthetic_vl_inputs(args.batch, args.tokens, bcfg.hidden, seed=args.seed + 1,
                                           vision_frac=(0.45, 0.55))
    cos, sin, mask = C.rope_and_mask(args.batch, args.tokens, bcfg.head_dim)
    data = cal.make_block_data(block_params, jnp.asarray(x), cos, sin, mask, modality, bcfg)
    vision_share = float((modality == C.VISION).mean())

    from splitq_jax.methods.splitq import split_linear as sl

    memo = SvdMemo(sl._svd_top)
    sl._svd_top = memo  # identical results; repeated decompositions of the same weight are reused
    prepared = prepare_all(names, args, block_params, data, bcfg)
    timing = time_interleaved(prepared, data, args.steps)
    ms = [summary(m, timing[m["name"]]) for m in prepared]
    by = {m["name"]: m for m in ms}
    ratio = paired = None
    if {"splitq", "flatquant"} <= by.keys():
        ratio = by["splitq"]["step_s"] / by["flatquant"]["step_s"]
        paired = paired_ratio(by["splitq"]["times"], by["flatquant"]["times"])
        log(f"splitq / flatquant step time: {ratio:.2f}x (ratio of medians), {paired:.2f}x (median of "
            f"step-by-step ratios) (goal <= {args.goal})")

    prof = []
    if "splitq" in by and (args.profile == "always" or (args.profile == "auto" and ratio is not None and ratio > args.goal)):
        log("profiling splitq components (one switched off at a time), interleaved with splitq")
        splitq_m = next(m for m in prepared if m["name"] == "splitq")
        for m in prepared:  # free what the profile does not need
            if m is not splitq_m:
                m["compiled"] = m["state"] = m["qconsts"] = None
        variants = prepare_all([v for v in VARIANTS if v not in by], args, block_params, data, bcfg)
        ptiming = time_interleaved([splitq_m, *variants], data, args.profile_steps)
        prof = [summary(m, ptiming[m["name"]]) for m in [splitq_m, *variants]]
        for m in prof[1:]:
            m["paired_vs_splitq"] = paired_ratio(m["times"], prof[0]["times"])
    sl._svd_top = memo.fn
    log(f"SVD memo: {memo.hits} reused, {len(memo.cache)} computed")
    del prepared
    gc.collect()

    common = dict(bench=BENCH, model=args.model, bits=args.bits, machine=machine, batch=args.batch,
                  tokens=args.tokens, vision_share=round(vision_share, 3))
    records = []
    for phase, group in (("main", ms), ("profile", prof)):
        for m in group:
            base = dict(common, method=m["name"], phase=phase, steps=len(m["times"]), warmup=args.warmup)
            if phase == "profile" and m["name"] == "splitq":
                # stats, compile and memory of splitq are those of the main phase (same executable)
                records.append(dict(base, metric="step_s", value=m["step_s"], unit="s"))
                records.append(dict(base, metric="step_times_s", value=[round(t, 4) for t in m["times"]], unit="s"))
                continue
            for metric, unit in (("step_s", "s"), ("compile_s", "s"), ("stats_s", "s"), ("init_s", "s"),
                                 ("svd_reused", "count"), ("xla_flops", "flop"), ("xla_bytes_accessed", "bytes"),
                                 ("xla_bytes", "bytes"), ("rss_delta_bytes", "bytes"),
                                 ("device_peak_bytes", "bytes"), ("n_params", "count")):
                if m.get(metric) is not None:
                    records.append(dict(base, metric=metric, value=m[metric], unit=unit))
            records.append(dict(base, metric="step_times_s", value=[round(t, 4) for t in m["times"]], unit="s"))
    if ratio is not None:
        records.append(dict(common, method="splitq/flatquant", phase="main", metric="step_ratio",
                            value=ratio, goal=args.goal, note="ratio of the median step times"))
        records.append(dict(common, method="splitq/flatquant", phase="main", metric="step_ratio_paired",
                            value=paired, goal=args.goal,
                            note="median of per-step ratios (steps interleaved, so load drift cancels)"))
    if prof:
        pby = {m["name"]: m for m in prof}
        full = pby["splitq"]["step_s"]
        for v in VARIANTS:
            if v in pby:
                records.append(dict(common, method=v, phase="profile", metric="component_cost_s",
                                    component=v.split("-no_")[1], value=full - pby[v]["step_s"],
                                    note="splitq step time minus step time with this component off"))
                records.append(dict(common, method=v, phase="profile", metric="step_ratio_paired_vs_splitq",
                                    component=v.split("-no_")[1], value=pby[v]["paired_vs_splitq"],
                                    note="median of per-step (variant / splitq) ratios"))
    wall = time.perf_counter() - t_start
    records.append(C.run_record(BENCH, machine, wall_s=round(wall, 1), args=vars(args)))
    out = Path(args.out) if args.out else C.RESULTS / f"{BENCH}-{machine}.json"
    C.write_json_atomic(out, records)

    print(f"\n{args.model}, batch {args.batch} x {args.tokens} tokens ({vision_share:.0%} vision), {args.bits}, {machine}")
    print(f"{'method':<18}{'phase':<9}{'step s':>9}{'compile s':>11}{'stats s':>9}{'init s':>8}{'xla GiB':>9}"
          f"{'rss delta GiB':>15}{'GFLOP':>9}{'GB accessed':>13}")
    for phase, group in (("main", ms), ("profile", prof)):
        for m in group:
            print(f"{m['name']:<18}{phase:<9}{m['step_s']:>9.2f}{m['compile_s']:>11.1f}{m['stats_s']:>9.1f}"
                  f"{m['init_s']:>8.1f}{(m['xla_bytes'] or 0) / 2**30:>9.2f}{m['rss_delta_bytes'] / 2**30:>15.2f}"
                  f"{(m['xla_flops'] or 0) / 1e9:>9.0f}{(m['xla_bytes_accessed'] or 0) / 1e9:>13.1f}")
    if ratio is not None:
        print(f"splitq / flatquant step time: {ratio:.2f}x (ratio of medians), {paired:.2f}x "
              f"(median of paired per-step ratios); goal <= {args.goal}")
    if prof:
        for v in VARIANTS:
            if v in pby:
                print(f"  cost of {v.split('-no_')[1]:<6}: {full - pby[v]['step_s']:+.2f}s per step "
                      f"({(full - pby[v]['step_s']) / full:+.0%} of splitq's step); step without it / "
                      f"splitq, paired: {pby[v]['paired_vs_splitq']:.2f}")
    print(f"wrote {out} ({wall:.0f}s)")


if __name__ == "__main__":
    main()
