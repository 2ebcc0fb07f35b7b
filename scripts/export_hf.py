"""Export a quantized checkpoint as an HF model directory in the compressed-tensors format.

    python scripts/export_hf.py --checkpoint runs/coder-gptq-w4a16 --out hf/coder-gptq-w4a16

The directory loads with ``transformers`` (plus the ``compressed-tensors`` package) and vLLM:
``AutoModelForCausalLM.from_pretrained(out)`` / ``Qwen2_5_VLForConditionalGeneration.from_pretrained(out)``.
Exportable: checkpoints of rtn, smoothquant, gptq, gptaq and vlm-ptq with 2- to 8-bit weights and
16-, 8- or 4-bit activations. FlatQuant and SplitQ checkpoints are refused (the format has no place
for their online transforms, channel split and low-rank branches), as are 2- and 3-bit activations
(no loader runs them). Exit status 2 on bad input, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitq_jax.errors import SplitqError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="directory written by scripts/calibrate.py")
    ap.add_argument("--out", required=True, help="the HF model directory to write (must not exist unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    t0 = time.time()
    from splitq_jax.interop.hf_export import export_hf

    try:
        record = export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    except SplitqError as e:  # user-fixable (refused format, bad checkpoint, existing --out)
        print(f"error: {e}", file=sys.stderr)
        return 2
    w, acts = record["weights"], record["input_activations"]
    groups = "per channel" if w["group_size"] is None else f"groups of {w['group_size']}"
    act_text = "" if acts is None else f", int{acts['bits']} dynamic per-token activations"
    sym = "symmetric" if w["symmetric"] else "asymmetric"
    print(f"wrote {args.out}: {record['model']} {record['method']} {record['bits']} as compressed-tensors "
          f"pack-quantized (int{w['bits']} {sym}, {groups}{act_text}) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
