"""Convert an HF LLaVA-1.5 / Qwen2.5-VL checkpoint into an orbax checkpoint of our Flax model.

    python scripts/convert.py --model llava-1.5-7b --out ckpt/llava7b [--check] [--dtype bfloat16]
    python scripts/convert.py --model /path/to/hf_dir --out ckpt/x --overwrite

``--model`` takes a named config (resolved to its hub id), a local HF checkpoint directory or a
hub id. ``--check`` also runs the transformers torch model on the same inputs and reports the
largest logit difference, top-1 agreement and whether greedy continuations are equal. The
report is printed as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitq_jax.models.converters.checkpoints import DTYPES, convert  # noqa: E402
from splitq_jax.models.converters.hf import ConversionError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="named config, HF checkpoint directory or hub id")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--check", action="store_true", help="compare with the transformers torch model")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="greedy tokens compared by --check")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        report = convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite, check=args.check,
                         max_new_tokens=args.max_new_tokens)
    except (ConversionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
