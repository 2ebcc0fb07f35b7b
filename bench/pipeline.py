"""The main job on the embedded default model: every method x every bit width, KL and top-1 agreement
against the full-precision model on held-out samples, plus the cost of a default CLI run.

Model: the embedded default of ``scripts/calibrate.py`` (``qwen2.5-vl-mini``: 4 decoder blocks,
hidden 128, the real Qwen2.5 vocabulary, tokenizer and image processor) with RANDOM weights
(seed 0). The numbers show that the whole pipeline works for every method and bit width
(calibration -> fold -> pack -> export -> reload -> integer inference), and how the error grows
as bits shrink; they say nothing about how good a method is on a trained model.

Data: the bundled calibration set (``calib`` split: easy-vqa train + calibration photographs) for
calibration; its disjoint ``eval`` split (easy-vqa test + other photographs) for evaluation.

Recipe (reduced, the same for every method): ``--samples`` calibration samples (default 32),
``--epochs`` epochs (default 2) for the learned methods (flatquant, splitq; rtn and smoothquant
learn nothing), batch size 4, seed 0, every other option the method's preset
(``config.method_config``).

Metrics (``splitq_jax.evaluate.position_stats`` / ``position_masks``): mean KL(P_fp || P_q) of
the next-token distributions and the fraction of positions where both models' top-1 token agree,
over every real position (``all``) and by kind (``text``, ``vision``, ``answer``: positions that
predict a reference-answer token). The quantized logits are ``runtime.QuantizedModel.logits`` of
the exported, reloaded checkpoint (packed integer weights).

Default run: ``python scripts/calibrate.py`` with no arguments (128 samples, 15 epochs, splitq
w4a4), started in a temporary working directory (so its ``runs/...`` output lands there), with
``HF_HUB_OFFLINE=1`` and without this process's ``XLA_FLAGS``: wall time and peak memory
(``ru_maxrss`` of that child, from ``os.wait4``); its checkpoint is evaluated like the others
(``recipe: "default"``).

Output: ONE JSON file ``bench/results/pipeline-<machine>.json`` (flat records + one ``run``
record), rewritten atomically after every configuration so an interrupted run keeps what it did.

Run from the repository root::

    python bench/pipeline.py                       # everything (~13 min on 2 shared CPU cores)
    python bench/pipeline.py --methods rtn --bits w4a8 --skip-default-run   # a quick look
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from splitq_jax import calib_data as cd  # noqa: E402
from splitq_jax import evaluate as ev  # noqa: E402
from splitq_jax.quantized import export  # noqa: E402
from splitq_jax import quantize as qz  # noqa: E402
from splitq_jax.config import BIT_PRESETS, METHODS, method_config  # noqa: E402
from splitq_jax.runtime import load_quantized  # noqa: E402

BENCH = "pipeline"
NOTE = ("embedded default model with RANDOM weights: the numbers show the pipeline's mechanics "
        "(every method and bit width end to end), not method quality")
SCOPES = ("all", "text", "vision", "answer")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32, help="calibration samples (CLI default: 128)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the learned methods (CLI default: 15)")
    ap.add_argument("--batch-size", type=int, default=4, help="calibration batch size")
    ap.add_argument("--eval-samples", type=int, default=16, help="held-out samples")
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bits", default=",".join(BIT_PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-default-run", action="store_true", help="do not time `python scripts/calibrate.py`")
    ap.add_argument("--default-timeout", type=float, default=1800.0, help="seconds before the default run is killed")
    ap.add_argument("--out", default=None, help="output JSON (default bench/results/pipeline-<machine>.json)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------ evaluation


class Evaluator:
    """FP logits of the held-out batches computed once; each quantized model is compared with them."""

    def __init__(self, handle: qz.ModelHandle, n: int, batch_size: int, seed: int):
        raw = cd.load_samples("default", n=n, split="eval", seed=seed)
        self.encoded = cd.encode_samples(raw, handle.family, handle.tokenizer, handle.image_cfg)
        self.batches = ev.eval_batches(self.encoded, batch_size, handle.pad_id)
        self.family = handle.family
        self.fp_logits = [ev.model_logits(handle.model, b, handle.family) for b in self.batches]
        self.masks = [ev.position_masks(b) for b in self.batches]
        self.counts = {s: int(sum(m[s].sum() for m in self.masks)) for s in SCOPES}

    def __call__(self, qm) -> dict[str, float]:
        sums = {f"{m}_{s}": 0.0 for m in ("kl", "top1") for s in SCOPES}
        for batch, fp, masks in zip(self.batches, self.fp_logits, self.masks):
            st = ev.position_stats(fp, ev.model_logits(qm, batch, self.family), jnp.asarray(batch["input_ids"]))
            kl, agree = np.asarray(st["kl"], np.float64), np.asarray(st["agree"], np.float64)
            for s in SCOPES:
                sums[f"kl_{s}"] += float(kl[masks[s]].sum())
                sums[f"top1_{s}"] += float(agree[masks[s]].sum())
        return {k: (v / self.counts[k.split("_", 1)[1]] if self.counts[k.split("_", 1)[1]] else math.nan)
                for k, v in sums.items()}


def metric_records(metrics: dict[str, float], counts: dict[str, int], base: dict) -> list[dict]:
    out = []
    for key, value in metrics.items():
        kind, scope = key.split("_", 1)
        out.append({**base, "metric": "kl" if kind == "kl" else "top1_agreement", "positions": scope,
                    "value": None if not math.isfinite(value) else value, "count": counts[scope]})
    return out


# ------------------------------------------------------------------------------ default run


def default_run(timeout: float) -> tuple[dict, Path | None, Path]:
    """``python scripts/calibrate.py`` (no arguments) in a temporary directory: wall time, peak RSS."""
    tmp = Path(tempfile.mkdtemp(prefix="splitq-pipeline-default-"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, str(C.REPO / "scripts" / "calibrate.py")]
    log_path = tmp / "calibrate.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    ckpts = sorted((tmp / "runs").glob("*")) if (tmp / "runs").is_dir() else []
    ckpt = ckpts[0] if proc.returncode == 0 and len(ckpts) == 1 else None
    rec = {"command": "python scripts/calibrate.py", "cwd": "a new temporary directory",
           "exit_status": proc.returncode, "timed_out": wall > timeout,
           "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024,
           "user_cpu_s": usage.ru_utime, "system_cpu_s": usage.ru_stime,
           "output": None if ckpt is None else f"runs/{ckpt.name}"}
    tail = log_path.read_text(errors="replace").replace("\r", "\n").splitlines()
    rec["log_tail"] = [line for line in tail if line.strip() and "it/s" not in line][-8:]
    return rec, ckpt, tmp


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    machine = C.machine_name()
    out_json = Path(args.out) if args.out else C.RESULTS / f"{BENCH}-{machine}.json"
    methods = [m for m in args.methods.split(",") if m]
    bits_list = [b for b in args.bits.split(",") if b]
    base = {"bench": BENCH, "model": qz.EMBEDDED_DEFAULT, "machine": machine}
    recipe = {"recipe": "reduced", "calib_samples": args.samples, "epochs_learned": args.epochs,
              "batch_size": args.batch_size, "eval_samples": args.eval_samples, "seed": args.seed}
    run = C.run_record(BENCH, machine, note=NOTE, **{f"pkg_{k}": v for k, v in export.package_versions().items()},
                       recipe={k: v for k, v in recipe.items() if k != "recipe"},
                       data="bundled default set: calib split for calibration, eval split (disjoint) for evaluation")
    records: list[dict] = []

    def save() -> None:
        C.write_json_atomic(out_json, records + [run])

    t_start = time.perf_counter()
    default_ckpt = default_tmp = None
    if not args.skip_default_run:
        log("default run: python scripts/calibrate.py (no arguments) ...")
        rec, default_ckpt, default_tmp = default_run(args.default_timeout)
        log(f"default run: exit {rec['exit_status']}, {rec['wall_s']:.0f} s, "
            f"peak RSS {rec['peak_rss_bytes'] / 2**30:.2f} GiB")
        records += [{**base, "method": "splitq", "bits": "w4a4", "recipe": "default", "metric": m, "value": rec[k],
                     "unit": u, "command": rec["command"], "exit_status": rec["exit_status"],
                     "note": "python scripts/calibrate.py with no arguments: 128 samples, 15 epochs"}
                    for m, k, u in (("default_run_wall", "wall_s", "s"),
                                    ("default_run_peak_rss", "peak_rss_bytes", "bytes"),
                                    ("default_run_user_cpu", "user_cpu_s", "s"))]
        run["default_run"] = rec
        save()

    log(f"model + {args.samples} calibration samples + {args.eval_samples} held-out samples ...")
    handle = qz.load_model_for_calibration(None, seed=args.seed)
    stream = qz.calibration_stream(handle, samples=args.samples, seed=args.seed, batch_size=8)
    evaluator = Evaluator(handle, args.eval_samples, args.eval_batch_size, args.seed)
    recipe["calib_tokens"] = int(stream.x.shape[1])
    run["counts"] = evaluator.counts
    log(f"stream {tuple(stream.x.shape)}; eval positions {evaluator.counts}")
    data_record = {"source": "default", "samples": int(stream.x.shape[0]), "tokens": int(stream.x.shape[1]),
                   "seed": args.seed}

    if default_ckpt is not None:
        metrics = evaluator(load_quantized(default_ckpt))
        records += metric_records(metrics, evaluator.counts, {**base, "method": "splitq", "bits": "w4a4",
                                                              "recipe": "default", "calib_samples": 128,
                                                              "epochs_learned": 15, "eval_samples": args.eval_samples})
        save()
    if default_tmp is not None:
        shutil.rmtree(default_tmp, ignore_errors=True)

    work = Path(tempfile.mkdtemp(prefix="splitq-pipeline-"))
    table = []
    try:
        for method in methods:
            for bits in bits_list:
                overrides = {"batch_size": args.batch_size, "seed": args.seed}
                if method_config(method, bits).epochs > 0:  # rtn / smoothquant learn nothing: keep epochs=0
                    overrides["epochs"] = args.epochs
                cfg = method_config(method, bits, **overrides)
                t0 = time.perf_counter()
                path, result = qz.quantize_model(handle, stream, cfg, work / f"{method}-{bits}",
                                                 data_record=data_record)
                seconds = time.perf_counter() - t0
                metrics = evaluator(load_quantized(path))
                shutil.rmtree(path, ignore_errors=True)
                rec_base = {**base, "method": method, "bits": bits, **recipe, "epochs": cfg.epochs}
                records += metric_records(metrics, evaluator.counts, rec_base)
                final = float(np.mean([r.final_loss for r in result.reports]))
                init = float(np.mean([r.init_loss for r in result.reports]))
                records += [{**rec_base, "metric": "calibrate_export_wall", "value": seconds, "unit": "s",
                             "note": "quantize_model: calibration of every block + fold + export "
                                     "(includes compilation)"},
                            {**rec_base, "metric": "block_mse_init_mean", "value": init},
                            {**rec_base, "metric": "block_mse_final_mean", "value": final}]
                table.append((method, bits, metrics, seconds))
                save()
                log(f"{method:<12} {bits}: KL {metrics['kl_all']:.4g}  top-1 {metrics['top1_all']:.3f}  "
                    f"block mse {init:.3g} -> {final:.3g}  ({seconds:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    run["total_s"] = time.perf_counter() - t_start
    save()
    print()
    print(f"{BENCH} on {machine}: {qz.EMBEDDED_DEFAULT}, {args.samples} calibration samples, {args.epochs} epochs "
          f"(learned methods), {args.eval_samples} held-out samples ({evaluator.counts['all']} positions)")
    print(f"NOTE: {NOTE}")
    print(f"{'method':<12} {'bits':<5} {'KL all':>9} {'KL text':>9} {'KL vision':>9} {'KL answer':>9} "
          f"{'top1 all':>8} {'top1 ans':>8} {'calib s':>8}")
    for method, bits, m, s in table:
        print(f"{method:<12} {bits:<5} {m['kl_all']:>9.4g} {m['kl_text']:>9.4g} {m['kl_vision']:>9.4g} "
              f"{m['kl_answer']:>9.4g} {m['top1_all']:>8.3f} {m['top1_answer']:>8.3f} {s:>8.0f}")
    if "default_run" in run:
        d = run["default_run"]
        print(f"\ndefault run (python scripts/calibrate.py, no arguments): exit {d['exit_status']}, "
              f"{d['wall_s']:.0f} s wall, peak RSS {d['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"\nwrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
