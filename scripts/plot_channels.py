"""Per-channel activation magnitude of text and vision tokens at one layer, MOCD channels marked.

    python scripts/plot_channels.py [--model NAME_OR_PATH] [--layer 1] [--group mlp_in] --out channels.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitq_jax import analysis  # noqa: E402
from splitq_jax import preflight  # noqa: E402
from splitq_jax import quantize as qz  # noqa: E402
from splitq_jax.block import GROUPS  # noqa: E402
from splitq_jax import methods  # noqa: E402
from splitq_jax.config import ConfigError  # noqa: E402
from splitq_jax.errors import SplitqError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="as in scripts/calibrate.py (default: embedded model)")
    ap.add_argument("--layer", type=int, default=None, help="decoder block index (default: the middle one)")
    ap.add_argument("--group", default="attn_in", choices=list(GROUPS), help="which linear group's input")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--calib-data", default="default")
    ap.add_argument("--out", default="channels.png")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        methods.add_method_flags(ap, methods.get_method(methods.method_name_from(argv, None)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args = ap.parse_args(argv)
    try:
        spec = methods.config_from_args(args)
        if not hasattr(spec, "engine_config"):  # the figure shows a transform method's channel split
            raise ConfigError(f"plot_channels shows the channels of a transform method (rtn, smoothquant, flatquant, "
                              f"splitq); --method {spec.method} has none")
        cfg = spec.engine_config()
        if args.samples < 1:
            raise SplitqError(f"--samples must be at least 1, got {args.samples}")
        preflight.check_output(Path(args.out))
        handle = qz.load_model_for_calibration(args.model, seed=cfg.seed)
        n_layers = len(list(handle.model.blocks))
        if args.layer is not None and not 0 <= args.layer < n_layers:
            raise SplitqError(f"--layer {args.layer} is out of range: {handle.name} has decoder blocks 0 to {n_layers - 1}")
        stream = qz.calibration_stream(handle, source=args.calib_data, samples=args.samples, seed=cfg.seed)
        layer = len(list(handle.model.blocks)) // 2 if args.layer is None else args.layer
        prof = analysis.channel_profile(handle.model, stream, layer, args.group, cfg)
    except SplitqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    analysis.plot_profile(prof, args.out, f"{handle.name}: layer {layer}, {args.group} input")
    print(f"wrote {args.out}: text channels {prof.split.text.tolist()}, vision channels {prof.split.vision.tolist()}")
    k = max(len(prof.split.text), len(prof.split.vision), 1)
    top_t, top_v = analysis.top_channels(prof.text_absmax, k), analysis.top_channels(prof.vision_absmax, k)
    print(f"largest {k} channels by max |X|: text {top_t.tolist()}, vision {top_v.tolist()}; "
          f"shared {len(set(top_t.tolist()) & set(top_v.tolist()))} of {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
