"""Evaluate a quantized checkpoint against the full-precision model it was made from.

    python scripts/evaluate.py --checkpoint runs/qwen2.5-vl-mini-splitq-w4a4
    python scripts/evaluate.py --checkpoint ckpt/qwen3b-w4a4 --data eval.jsonl --json results/qwen3b-w4a4.json

Held-out data: the bundled set's evaluation split (disjoint from calibration) or a JSONL file
(one ``{"image": path, "prompt": ..., "answer": ...}`` per line; keep it apart from the
calibration file). Metrics are defined in ``splitq_jax/evaluate.py``. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from splitq_jax import calib_data as cd  # noqa: E402
from splitq_jax import evaluate as ev  # noqa: E402
from splitq_jax import preflight  # noqa: E402
from splitq_jax.errors import SplitqError  # noqa: E402
from splitq_jax.fsutil import write_json  # noqa: E402
from splitq_jax.runtime import load_quantized  # noqa: E402

DEFAULT_SAMPLES = 32


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="directory written by scripts/calibrate.py")
    ap.add_argument("--data", default="default",
                    help="'default' (bundled evaluation split; held-out Python code for a text-only model), "
                         "'stdlib' (code) or a JSONL file")
    ap.add_argument("--max-tokens", type=int, default=512, help="code window length for text-only models")
    ap.add_argument("--samples", type=int, default=None,
                    help=f"samples to evaluate (default {DEFAULT_SAMPLES} of the bundled set, all of a JSONL file)")
    ap.add_argument("--seed", type=int, default=0, help="which samples (default 0)")
    ap.add_argument("--batch-size", type=int, default=4, help="samples per forward pass (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="generated tokens for exact match (default 8)")
    ap.add_argument("--json", default=None, help="write the results as JSON records to this file")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    bars: dict[str, tqdm] = {}

    def on_batch(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=stage, leave=False)
        bars[stage].update(1)
        if done == total:
            bars.pop(stage).close()

    try:
        for flag in ("samples", "batch_size", "max_new_tokens"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ev.EvaluateError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
        if args.json:
            preflight.check_output(Path(args.json), "--json")  # not after minutes of evaluation
        # Data errors surface before the minutes the models may take to load.
        n = args.samples if args.samples is not None or args.data != cd.DEFAULT_SOURCE else DEFAULT_SAMPLES
        code = args.data == cd.CODE_SOURCE
        raw = None if code else cd.load_samples(args.data, n=n, split="eval", seed=args.seed)
        qm = load_quantized(args.checkpoint)
        text_only = getattr(qm.config, "vision", True) is None
        if text_only and args.data == cd.DEFAULT_SOURCE:
            code, raw = True, None  # a text-only model is evaluated on held-out Python code
        if code and not text_only:
            raise ev.EvaluateError(f"--data {cd.CODE_SOURCE} is for text-only models; this checkpoint is a "
                                   "vision-language model")
        if args.data != cd.DEFAULT_SOURCE and qm.manifest.get("data", {}).get("source") == args.data:
            print(f"warning: {args.data} is also the checkpoint's calibration data; the numbers are not held-out",
                  file=sys.stderr)
        ref = ev.load_reference(qm)
        if code:
            encoded = cd.code_samples(ref.tokenizer, split="eval", n=n or DEFAULT_SAMPLES, seed=args.seed,
                                      max_tokens=args.max_tokens)
        else:
            encoded = cd.encode_samples(raw, ref.family, ref.tokenizer, ref.image_cfg)
            cd.check_lengths(encoded, what="evaluation", fix="drop it from the evaluation file")
        batches = ev.eval_batches(encoded, args.batch_size, ref.pad_id)
        print(f"{qm.manifest['model']['name']} {qm.manifest['method']} {qm.manifest['bits']}: {len(encoded)} samples "
              f"x {batches[0]['input_ids'].shape[1]} tokens ({time.time() - t0:.1f} s to load)")
        result = ev.evaluate(qm, ref.model, batches, encoded, tokenizer=ref.tokenizer, family=ref.family,
                             max_new_tokens=args.max_new_tokens, pad_id=ref.pad_id, on_batch=on_batch)
    except SplitqError as e:  # user-fixable; a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for bar in bars.values():
            bar.close()
    print(ev.format_table(result))
    if args.json:
        extra = {"split": "eval", "data": str(args.data), "samples": result["n_samples"], "seed": args.seed,
                 "max_new_tokens": args.max_new_tokens}
        records = ev.result_records(result, qm.manifest, **extra)
        command = [Path(sys.executable).name, "scripts/evaluate.py", *(sys.argv[1:] if argv is None else argv)]
        records.append(ev.run_record(command, checkpoint=str(Path(args.checkpoint).absolute()),
                                     seconds=round(time.time() - t0, 1)))
        write_json(Path(args.json), records)  # atomic: a reader never sees half a file
        print(f"wrote {args.json}")
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
