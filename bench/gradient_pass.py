"""Memory and time of the whole-model gradient pass (MBQ, TLQ) on the real small VLM, and what it
finds: MBQ's layer ratios.

    python bench/gradient_pass.py                      # easyvqa-vlm-0.5b, 128 calibration samples
    python bench/gradient_pass.py --samples 16

Steps: load the model, build ``--samples`` calibration samples of the bundled default data (as
``scripts/calibrate.py`` does), embed them, then run :func:`splitq_jax.calib.gradients.gradient_pass`
(one sample at a time, each block rematerialised in the backward pass). Peak RSS is the process's
high-water mark over the pass alone (reset before it) and over the whole run; "before" is the RSS
with the model and the stream in memory. Writes ``bench/results/gradient_pass-<machine>.json``:
peak RSS, seconds per sample (after the first, which compiles), the answer loss, and the raw and
floored MBQ ratios per layer (o_proj for attention, down_proj for the MLP).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.REPO))
from splitq_jax import pipeline  # noqa: E402
from splitq_jax import quantize as qz  # noqa: E402
from splitq_jax.calib import gradients as gr  # noqa: E402

BENCH = "gradient_pass"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="easyvqa-vlm-0.5b")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    machine = C.machine_name()
    out = Path(args.out or C.RESULTS / f"{BENCH}-{machine}.json")
    t0 = time.perf_counter()
    handle = qz.load_model_for_calibration(args.model, seed=args.seed)
    batches = qz.calibration_batches(handle, source="default", samples=args.samples, seed=args.seed, batch_size=1)
    stream = pipeline.embed_batches(handle.model, batches, handle.family)
    prep_s = time.perf_counter() - t0
    before = C.current_rss_bytes()
    C.reset_peak_rss()
    times: list[float] = []
    last = [time.perf_counter()]

    def on_sample(done: int, total: int) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        if done % 16 == 0 or done == total:
            print(f"gradient pass: {done}/{total} samples ({times[-1]:.2f} s the last)", flush=True)

    result = gr.gradient_pass(handle.model, stream, on_sample=on_sample)
    pass_peak = C.window_peak_rss_bytes()
    modality = np.asarray(stream.modality)
    raw = gr.layer_ratios(result, modality)
    floored, note = gr.modality_ratios(result, modality)
    base = {"bench": BENCH, "machine": machine, "model": args.model, "samples": int(modality.shape[0]),
            "tokens_per_sample": int(modality.shape[1]), "vision_tokens": int((modality == 2).sum()),
            "answer_tokens": int(result.answer.sum())}
    recs = [{**base, "metric": m, "value": v} for m, v in (
        ("rss_before_pass_bytes", before), ("pass_peak_rss_bytes", pass_peak),
        ("pass_peak_over_before_bytes", None if pass_peak is None else pass_peak - before),
        ("process_peak_rss_bytes", C.peak_rss_bytes()),
        ("first_sample_seconds", times[0]),
        ("seconds_per_sample", float(np.median(times[1:])) if len(times) > 1 else None),
        ("mean_answer_loss", float(result.losses.mean())), ("prepare_seconds", prep_s))]
    for layer in range(raw.shape[0]):
        for k, tap in enumerate(result.taps):
            recs.append({**base, "metric": f"ratio_raw_{tap}", "layer": layer, "value": float(raw[layer, k])})
            recs.append({**base, "metric": f"ratio_{tap}", "layer": layer, "value": float(floored[layer, k])})
    recs.append(C.run_record(BENCH, machine, fallback=result.fallback, vision_note=note))
    C.write_json_atomic(out, recs)
    gb = 1024 ** 3
    print(f"wrote {out}: peak RSS {pass_peak / gb:.2f} GB during the pass ({before / gb:.2f} GB before it), "
          f"{np.median(times[1:]) if len(times) > 1 else float('nan'):.2f} s per sample; "
          f"attention ratios {np.round(floored[:, 0], 3).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
