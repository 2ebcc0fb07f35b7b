"""Component ablation of SplitQ on one decoder block with heterogeneous synthetic VLM inputs.

Block: one Qwen2-style block of Qwen2.5-0.5B's shape (hidden 896, intermediate 4864, 14 heads,
2 KV heads, head_dim 64, qkv bias) with random N(0, 1/fan_in) weights (``bench/_common.py``).

Inputs: ``_common.synthetic_vl_inputs`` — each sample is a text prefix, one contiguous span of
vision tokens (40-60% of the sequence) and text; vision tokens carry outliers in a few channels of
their own, text tokens in *other* channels (two massive-and-consistent ones, and unstable ones
whose relative magnitude jumps token to token), over a heavy-tailed (Student-t) background with
modality-specific channel scales. See that function's docstring for the exact generator. Only the
block input is synthetic: o_proj's and down_proj's inputs come from the block itself.
Calibration and held-out samples are independent draws of the same generator.

Methods (all at the same recipe: samples, tokens, batch, epochs):

* ``rtn``, ``smoothquant``: closed form, nothing learned;
* ``flatquant``: learned Kronecker transform + clipping (``method_config("flatquant", bits)``);
* ``flatquant+mocd``: + MOCD channel split (``method_config("splitq", bits, cws=False, mac=False)``);
* ``flatquant+mocd+cws``: + CWS low-rank branch (``method_config("splitq", bits, mac=False)``);
* ``splitq``: + MAC (full SplitQ, ``method_config("splitq", bits)``);
* ``splitq-k1`` (not in the default run): SplitQ with Eq. 10's instability as the plain rank
  variance (``instability="variance"``, K = 1).

Metric: block-output MSE against the full-precision block (mean over channels, then over tokens;
the library's ``evaluate``), on the held-out samples and on the calibration samples, also split by
modality (text / vision tokens). Also: the calibration loss before training (``init``), wall time
per method (fit_block, i.e. init + evaluation + training, excluding the channel statistics,
which are computed once per selector and recorded separately), and how many of the generator's
outlier channels MOCD's split recovered.

Run from the repository root: ``python bench/block_ablation.py [--samples 8 --tokens 256 ...]``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from splitq_jax import calibrate as cal  # noqa: E402
from splitq_jax.block import BlockConfig  # noqa: E402
from splitq_jax.config import COMPONENT_VARIANTS, method_config  # noqa: E402

BENCH = "block_ablation"
MODELS = {"qwen2-0.5b-block": C.QWEN2_05B, "qwen2.5-vl-3b-block": C.QWEN25_VL_3B}
# name -> (preset, overrides)
METHODS = {"rtn": ("rtn", {}), "smoothquant": ("smoothquant", {}), **COMPONENT_VARIANTS}
DEFAULT_METHODS = tuple(METHODS)
# Not in the default run: SplitQ with Eq. 10's [choice] switched to the plain rank variance (K = 1).
METHODS["splitq-k1"] = ("splitq", dict(instability="variance", n_clusters=1))
LEARNED = ("flatquant", "flatquant+mocd", "flatquant+mocd+cws", "splitq", "splitq-k1")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-0.5b-block", choices=sorted(MODELS))
    ap.add_argument("--samples", type=int, default=8, help="calibration samples")
    ap.add_argument("--heldout", type=int, default=4, help="held-out samples")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sample")
    ap.add_argument("--batch", type=int, default=4, help="calibration batch size")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of every learned method (paper: 15)")
    ap.add_argument("--bits", default="w4a8,w4a4,w3a3,w3a2")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma list from {', '.join(METHODS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output JSON (default bench/results/block_ablation-<machine>.json)")
    return ap.parse_args(argv)


def config_of(name: str, bits: str, args):
    preset, over = METHODS[name]
    cfg = method_config(preset, bits, **over)
    if name in LEARNED:
        cfg = cfg.replace(epochs=args.epochs, batch_size=args.batch, seed=args.seed)
    else:
        cfg = cfg.replace(batch_size=args.batch, seed=args.seed)
    return cfg


def stats_key(cfg) -> tuple:
    """Everything ``collect_stats`` reads from the config (the split does not depend on bits)."""
    return (cfg.selector, cfg.text_ratio, cfg.vision_ratio, cfg.n_clusters, cfg.instability,
            cfg.mocd_o_proj, cfg.text_tokens, cfg.seed)


@functools.lru_cache(maxsize=64)
def token_errors_fn(cfg, bcfg):
    """Jitted per-token squared error (mean over channels) of the quantized block."""

    @jax.jit
    def f(qp, qc, b):
        out = cal.qblock_forward(qp, qc, b.x, b.cos, b.sin, b.mask, b.modality, cfg, bcfg)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - b.y.astype(jnp.float32)), axis=-1)

    return f


def mse_by_modality(qp, qc, data, cfg, bcfg, batch: int) -> dict[str, float]:
    f = token_errors_fn(cfg, bcfg)
    errs = np.concatenate([np.asarray(f(qp, qc, data.batch(i, batch)))
                           for i in range(0, data.x.shape[0], batch)]).reshape(-1)
    mod = np.asarray(data.modality).reshape(-1)
    out = {"all": float(errs[mod != C.PAD].mean())}
    for name, code in (("text", C.TEXT), ("vision", C.VISION)):
        sel = mod == code
        out[name] = float(errs[sel].mean()) if sel.any() else float("nan")
    return out


def split_hits(stats, channels) -> dict[str, dict[str, int]]:
    """How many of the generator's outlier channels landed in each group, for the two groups whose
    input is the (normalised) synthetic block input."""
    n_logn = (channels["text_unstable"].size + 1) // 2
    kinds = {"vision": channels["vision"], "text_unstable_lognormal": channels["text_unstable"][:n_logn],
             "text_unstable_spiky": channels["text_unstable"][n_logn:], "text_massive": channels["text_massive"]}
    out = {}
    for g in ("attn_in", "mlp_in"):
        st = stats[g]
        for kind, chans in kinds.items():
            out[f"{g}/{kind}"] = dict(
                total=int(chans.size),
                in_vision_group=int(np.isin(chans, st.vision_idx).sum()),
                in_text_group=int(np.isin(chans, st.text_idx).sum()))
    return out


class Timed:
    """Wraps a library function to add up its wall time (behaviour unchanged)."""

    def __init__(self, fn):
        self.fn, self.total = fn, 0.0

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.total += time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    machine = C.machine_name()
    bcfg = BlockConfig(**MODELS[args.model])
    bits_list = [b.strip() for b in args.bits.split(",") if b.strip()]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for n in names:
        if n not in METHODS:
            raise SystemExit(f"unknown method {n!r}: choose from {', '.join(METHODS)}")
    out_path = Path(args.out) if args.out else C.RESULTS / f"{BENCH}-{machine}.json"
    recipe = dict(samples=args.samples, heldout=args.heldout, tokens=args.tokens, batch=args.batch,
                  epochs=args.epochs, steps=args.epochs * (args.samples // min(args.batch, args.samples)))
    common = dict(bench=BENCH, model=args.model, machine=machine)
    log(f"{BENCH}: {args.model} on {machine}; recipe {recipe}; bits {bits_list}; methods {names}")

    block_params = C.block_params(bcfg, seed=args.seed)
    datasets = {}
    channels = None
    for split, n, seed in (("calib", args.samples, args.seed + 1), ("heldout", args.heldout, args.seed + 2)):
        x, modality, channels = C.synthetic_vl_inputs(n, args.tokens, bcfg.hidden, seed=seed)
        cos, sin, mask = C.rope_and_mask(n, args.tokens, bcfg.head_dim)
        datasets[split] = cal.make_block_data(block_params, jnp.asarray(x), cos, sin, mask, modality, bcfg)
    calib, heldout = datasets["calib"], datasets["heldout"]
    upd = {s: float(jnp.mean(jnp.square(d.y - d.x))) for s, d in datasets.items()}
    vis_share = float(np.mean(np.asarray(calib.modality) == C.VISION))
    log(f"data ready: vision share {vis_share:.2f}, mean square of the block's update (y - x): {upd}")

    records: list[dict] = [
        dict(common, method="fp", bits="w16a16", metric="update_ms", split=s, value=v,
             note="mean square of the full-precision block's update y - x (scale of the MSEs)", **recipe)
        for s, v in upd.items()
    ]

    # Channel statistics once per selector setting (independent of the bit width).
    stats_cache: dict[tuple, tuple] = {}

    def stats_for(cfg):
        k = stats_key(cfg)
        if k not in stats_cache:
            t0 = time.perf_counter()
            st = cal.collect_stats(block_params, calib, cfg, bcfg, batch_size=args.batch)
            stats_cache[k] = (st, time.perf_counter() - t0)
            log(f"stats for selector={cfg.selector}: {stats_cache[k][1]:.1f}s")
            if cfg.split:
                hits = split_hits(st, channels)
                for grp, h in hits.items():
                    records.append(dict(common, method="mocd", bits="any", metric="split_hits", group=grp,
                                        instability=cfg.instability, n_clusters=cfg.n_clusters, value=h["in_text_group"] + h["in_vision_group"],
                                        **h, **recipe))
                log("  MOCD recovered (attn_in / mlp_in): " + "; ".join(
                    f"{k}: T{h['in_text_group']} V{h['in_vision_group']} of {h['total']}" for k, h in hits.items()))
            records.append(dict(common, method="stats", bits="any", metric="stats_s", selector=cfg.selector,
                                value=stats_cache[k][1], **recipe))
        return stats_cache[k][0]

    results: dict[tuple[str, str], dict] = {}
    timed_init = Timed(cal.init_qblock)
    timed_eval = Timed(cal.evaluate)
    cal.init_qblock, cal.evaluate = timed_init, timed_eval  # timing only; fit_block looks them up
    try:
        for name in names:
            for bits in bits_list:
                cfg = config_of(name, bits, args)
                stats = stats_for(cfg)
                timed_init.total = timed_eval.total = 0.0
                step_times: list[float] = []
                t_last = [time.perf_counter()]

                def on_step(t, loss):
                    now = time.perf_counter()
                    step_times.append(now - t_last[0])
                    t_last[0] = now

                t0 = time.perf_counter()
                res = cal.fit_block(block_params, calib, cfg, bcfg, key=jax.random.PRNGKey(args.seed),
                                          stats=stats, on_step=on_step)
                wall = time.perf_counter() - t0
                t1 = time.perf_counter()
                m_cal = mse_by_modality(res.qparams, res.qconsts, calib, cfg, bcfg, args.batch)
                m_held = mse_by_modality(res.qparams, res.qconsts, heldout, cfg, bcfg, args.batch)
                eval_wall = time.perf_counter() - t1
                if abs(m_cal["all"] - res.final_loss) > 1e-4 * max(res.final_loss, 1e-12):
                    log(f"  WARNING: per-token calib MSE {m_cal['all']:.6g} != library final_loss {res.final_loss:.6g}")
                r = dict(heldout=m_held, calib=m_cal, init=res.init_loss, final=res.final_loss, wall=wall,
                         epoch_losses=res.epoch_losses, init_s=timed_init.total, eval_s=timed_eval.total,
                         step_times=step_times, eval_wall=eval_wall)
                results[(name, bits)] = r
                base = dict(common, method=name, bits=bits, **recipe)
                if name not in LEARNED:
                    base.update(epochs=0, steps=0)
                for split, m in (("heldout", m_held), ("calib", m_cal)):
                    records.append(dict(base, metric="block_mse", split=split, value=m["all"]))
                    records.append(dict(base, metric="block_mse_text", split=split, value=m["text"]))
                    records.append(dict(base, metric="block_mse_vision", split=split, value=m["vision"]))
                records.append(dict(base, metric="block_mse_init", split="calib", value=res.init_loss,
                                    note="calibration-set MSE at initialisation, before any training"))
                records.append(dict(base, metric="train_loss_per_epoch", split="calib", value=res.epoch_losses))
                records.append(dict(base, metric="wall_s", value=wall,
                                    note="fit_block: init + 2 evaluations + training (incl. compiles); "
                                         "excludes channel statistics"))
                records.append(dict(base, metric="init_s", value=timed_init.total))
                if step_times:
                    records.append(dict(base, metric="first_step_s", value=step_times[0],
                                        note="from fit_block's start to the end of the first step: "
                                             "init, initial evaluation, compile and one step"))
                    if len(step_times) > 1:
                        records.append(dict(base, metric="step_s", value=float(np.median(step_times[1:]))))
                log(f"{name:<20} {bits}: heldout {m_held['all']:.5g} (text {m_held['text']:.4g}, vision "
                    f"{m_held['vision']:.4g}) calib {res.init_loss:.5g} -> {res.final_loss:.5g}  "
                    f"wall {wall:.0f}s (init {timed_init.total:.0f}s, evaluate {timed_eval.total:.0f}s, "
                    f"to first step end {step_times[0] if step_times else 0:.0f}s, later steps "
                    f"{np.median(step_times[1:]) if len(step_times) > 1 else 0:.1f}s each)")
                C.write_json_atomic(out_path, records + [C.run_record(BENCH, machine, partial=True, args=vars(args))])
    finally:
        cal.init_qblock, cal.evaluate = timed_init.fn, timed_eval.fn

    total = time.perf_counter() - t_start
    records.append(C.run_record(BENCH, machine, wall_s=round(total, 1), args=vars(args), **recipe))
    C.write_json_atomic(out_path, records)

    def table(title, value, fmt="{:.4g}"):
        print(f"\n{title}")
        print(f"{'method':<22}" + "".join(f"{b:>11}" for b in bits_list))
        for name in names:
            cells = []
            for b in bits_list:
                r = results.get((name, b))
                cells.append(f"{fmt.format(value(r)) if r else '-':>11}")
            print(f"{name:<22}" + "".join(cells))

    print(f"\n{args.model}, {machine}; recipe: {recipe}; block update mean square: "
          f"calib {upd['calib']:.4g}, heldout {upd['heldout']:.4g}")
    table("block-output MSE, held-out samples", lambda r: r["heldout"]["all"])
    table("block-output MSE, held-out, text tokens", lambda r: r["heldout"]["text"])
    table("block-output MSE, held-out, vision tokens", lambda r: r["heldout"]["vision"])
    table("block-output MSE, calibration samples (after training)", lambda r: r["final"])
    table("block-output MSE, calibration samples, at initialisation", lambda r: r["init"])
    table("wall time per method [s] (fit_block)", lambda r: r["wall"], "{:.0f}")
    print(f"\nwrote {out_path} ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
