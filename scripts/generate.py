"""Ask a quantized checkpoint about an image.

    python scripts/generate.py --checkpoint runs/qwen2.5-vl-mini-splitq-w4a4 --image cat.png \\
        --prompt "What is in this picture?"

The prompt goes through the model's chat template and image processor (as in calibration);
decoding is greedy. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitq_jax import evaluate as ev  # noqa: E402
from splitq_jax import preprocess as pp  # noqa: E402
from splitq_jax.export import CheckpointError  # noqa: E402
from splitq_jax.runtime import load_quantized  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="directory written by scripts/calibrate.py")
    ap.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    ap.add_argument("--prompt", required=True, help="the question or instruction")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="longest reply in tokens (default 32)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        image = pp.load_image(args.image) if Path(args.image).is_file() else None
        if image is None:
            raise ValueError(f"image {args.image!r} does not exist or is not a file")
        qm = load_quantized(args.checkpoint)
        tokenizer, image_cfg = ev.processor_for(qm.manifest)
        text = ev.generate_text(qm, image, args.prompt, family=qm.family, tokenizer=tokenizer, image_cfg=image_cfg,
                                max_new_tokens=args.max_new_tokens)
    except (CheckpointError, ev.EvaluateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
