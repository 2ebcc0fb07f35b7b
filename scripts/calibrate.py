"""Quantize a vision-language model to a low-bit checkpoint.

    python scripts/calibrate.py                                   # embedded default model, offline
    python scripts/calibrate.py --model qwen2.5-vl-3b --method splitq --bits w4a4 --out ckpt/qwen3b-w4a4
    python scripts/calibrate.py --model /path/to/hf_dir --calib-data my.jsonl --samples 64 --resume
    python scripts/calibrate.py --bits w3a3 --quantize-vision --vision-bits w4a4   # vision tower too

Every option of the chosen method (see ``splitq_jax/methods/``) is a flag of the same name
(``--method flatquant --help`` lists FlatQuant's); ``--config
FILE`` reads them from JSON (flags typed on the command line win). Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from splitq_jax import pipeline, preflight  # noqa: E402
from splitq_jax import quantize as qz  # noqa: E402
from splitq_jax.pipeline import Stream  # noqa: E402
from splitq_jax.calib_data import CODE_SOURCE, load_samples  # noqa: E402
from splitq_jax import methods  # noqa: E402
from splitq_jax.config import ConfigError  # noqa: E402
from splitq_jax.methods import option_names  # noqa: E402
from splitq_jax.errors import SplitqError  # noqa: E402
from splitq_jax import sharding  # noqa: E402
from splitq_jax.calib.vision import vision_method_config  # noqa: E402


def build_parser(method_name: str) -> argparse.ArgumentParser:
    """The run's options plus ``--method``, ``--bits`` and the flags of ``method_name`` only."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="named config (qwen2.5-vl-3b, qwen2.5-vl-7b, llava-1.5-7b, llava-1.5-13b), HF directory "
                         "or hub id; default: the embedded tiny Qwen2.5-VL (offline)")
    ap.add_argument("--out", default=None, help="output directory (default runs/<model>-<method>-<bits>)")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    ap.add_argument("--calib-data", default="default",
                    help="'default' (bundled images + questions; Python code for a text-only model), "
                         "'stdlib' (Python standard-library code) or a JSONL file")
    ap.add_argument("--calib-batch-size", type=int, default=8, help="samples per embedding batch")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="cut samples longer than this many tokens (default: refuse samples over 2048 tokens; "
                         "text-only models: the code window, default 512)")
    ap.add_argument("--devices", type=int, default=None,
                    help="calibrate on the first N devices, each block's samples split over them (default: every "
                         "local device; 1: one device)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run from its last block")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument("--quantize-vision", action="store_true",
                    help="also quantize the vision tower (paper A.4); calibrated on the calibration images")
    ap.add_argument("--vision-bits", default=None,
                    help="bit widths wXaY of the vision tower, e.g. w4a4 (default: --bits)")
    ap.add_argument("--config", default=None,
                    help="JSON file of options of the method (and 'method', 'bits'); flags typed here win")
    ap.add_argument("--export-hf", default=None, metavar="DIR",
                    help="also write the checkpoint as an HF model directory in the compressed-tensors format "
                         "(scripts/export_hf.py; rtn, smoothquant, gptq, gptaq, vlm-ptq); checked before calibration")
    methods.add_method_flags(ap, methods.get_method(method_name))
    return ap


def parse_args(argv=None) -> tuple[argparse.Namespace, dict | None]:
    """``--method`` (or the ``--config`` file's ``method``) first, then that method's flags only.

    Returns the parsed flags and the config file's options. A flag of another method, an unknown
    method or an unreadable config file is a ConfigError naming the method's valid options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    file_options = methods.read_config_file(known.config) if known.config else None
    name = methods.method_name_from(argv, file_options)
    ap = build_parser(name)
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        method = methods.get_method(name)
        flags = [u.split("=")[0] for u in unknown if u.startswith("--")]
        owners = {f: methods.option_owners(f[2:].replace("-", "_")) for f in flags}
        where = "; ".join(f"{f} is an option of {', '.join(o)}" for f, o in owners.items() if o)
        raise ConfigError(f"{' '.join(unknown)}: not an option of {name}{' (' + where + ')' if where else ''}; "
                          f"{name}'s options: {', '.join('--' + o.replace('_', '-') for o in option_names(method.config_class))} "
                          f"(see --method {name} --help)")
    return args, file_options


def main(argv=None) -> int:
    try:
        args, file_options = parse_args(argv)
        spec = methods.config_from_args(args, file_options)
        # The transform engine's methods run their engine setting; any other method its own config.
        cfg = spec.engine_config() if hasattr(spec, "engine_config") else spec
        for flag, value in (("--samples", args.samples), ("--calib-batch-size", args.calib_batch_size),
                            ("--max-tokens", args.max_tokens)):
            if value is not None and value < 1:
                raise qz.QuantizeError(f"{flag} must be at least 1, got {value}")
        if args.vision_bits and not args.quantize_vision:
            raise qz.QuantizeError("--vision-bits needs --quantize-vision")
        vision_cfg = vision_method_config(cfg, args.vision_bits) if args.quantize_vision else None
        # Refuse a bad output directory or calibration file before spending minutes loading a model.
        name = args.model or qz.EMBEDDED_DEFAULT
        out = Path(args.out or f"runs/{name.strip('/').replace('/', '_')}-{cfg.method}-{cfg.bits}")
        if out.exists() and not args.overwrite:
            raise qz.QuantizeError(f"output directory {out} already exists; pass --overwrite to replace it "
                                   "or choose another --out")
        if args.resume and not (out.with_name(out.name + ".work") / "run.json").exists():
            raise qz.QuantizeError(f"nothing to resume for {out}: no interrupted run there; run without --resume")
        preflight.check_output(out)
        if args.export_hf:  # a run whose export cannot succeed fails now, not after calibrating
            from splitq_jax.interop.hf_export import check_request

            check_request(cfg, model_name=args.model, quantize_vision=args.quantize_vision, out_dir=args.export_hf,
                          overwrite=args.overwrite)
            preflight.check_output(Path(args.export_hf), "--export-hf")
        qz.preflight_config(args.model, cfg)
        mesh = sharding.data_mesh(args.devices)  # a device count the machine lacks fails before the model loads
        raw = (None if args.calib_data in ("default", CODE_SOURCE)
               else load_samples(args.calib_data, n=args.samples, seed=cfg.seed))
        handle = qz.load_model_for_calibration(args.model, seed=cfg.seed)
        disk = qz.preflight_model(handle, cfg, out, vision_cfg)
        if args.export_hf:  # about the checkpoint's size again (float tensors and packed weights)
            preflight.check_disk(args.export_hf, disk["checkpoint_bytes"])
        t0 = time.time()
        batches = qz.calibration_batches(handle, source=args.calib_data, samples=args.samples, seed=cfg.seed,
                                         batch_size=args.calib_batch_size, max_tokens=args.max_tokens, raw=raw)
        memory = qz.check_batches_fit(handle, batches, cfg)
        gb = preflight.GB
        print(f"pre-flight: calibration needs about {memory / gb:.1f} GB of memory beyond the model; the "
              f"checkpoint about {disk['checkpoint_bytes'] / gb:.2f} GB of disk "
              f"({disk['disk_bytes'] / gb:.2f} GB while it is written)"
              + (", its --export-hf copy about as much" if args.export_hf else ""))
        stream = pipeline.embed_batches(handle.model, batches, handle.family)
        vision = qz.vision_job(handle, batches, cfg, args.vision_bits) if args.quantize_vision else None
        print(f"{handle.name}: {cfg.method} {cfg.bits}; {stream.x.shape[0]} samples x {stream.x.shape[1]} tokens "
              f"({time.time() - t0:.1f} s to prepare)")
        if vision is not None:
            print(f"vision tower: {vision.cfg.method} {vision.cfg.bits}; {vision.stream.x.shape[0]} images x "
                  f"up to {vision.stream.x.shape[1]} patches")
        bars: dict[Any, tqdm] = {}
        reports = []

        def steps_per_block(s: Stream, c) -> int:
            return c.epochs * (s.x.shape[0] // min(c.batch_size, s.x.shape[0])) if getattr(c, "trains", False) else 0

        def stepper(part: str, s: Stream, c):
            label = "block" if part == "language" else "vision"

            def on_step(block: int, step: int, loss: float) -> None:
                if (part, block) not in bars:
                    bars[part, block] = tqdm(total=steps_per_block(s, c), desc=f"{label} {block:>3}", leave=False)
                bars[part, block].update(1)
                bars[part, block].set_postfix(loss=f"{loss:.4g}")

            return on_step

        def on_block(r) -> None:
            if (r.part, r.index) in bars:
                bars.pop((r.part, r.index)).close()
            reports.append(r)
            state = "resumed" if r.resumed else f"{r.init_loss:.4g} -> {r.final_loss:.4g}"
            label = "block" if r.part == "language" else "vision"
            tqdm.write(f"{label} {r.index:>3}: mse {state} ({r.seconds:.1f} s)")

        def on_model_pass(done: int, total: int) -> None:
            if "pass" not in bars:
                bars["pass"] = tqdm(total=total, desc="gradient pass", leave=False)
            bars["pass"].update(1)
            if done == total:
                bars.pop("pass").close()
                tqdm.write(f"gradient pass: {total} samples")

        data_record = {"source": args.calib_data, "samples": int(stream.x.shape[0]),
                       "tokens": int(stream.x.shape[1]), "seed": cfg.seed}
        path, _ = qz.quantize_model(handle, stream, cfg, out, data_record=data_record,
                                    overwrite=args.overwrite, resume=args.resume,
                                    on_step=stepper("language", stream, cfg), on_block=on_block, vision=vision,
                                    on_vision_step=None if vision is None else stepper("vision", vision.stream,
                                                                                       vision.cfg),
                                    on_model_pass=on_model_pass, devices=mesh)
        if args.export_hf:
            from splitq_jax.interop.hf_export import export_hf

            export_hf(path, args.export_hf, overwrite=args.overwrite)
            print(f"wrote {args.export_hf} (compressed-tensors; load it with transformers' from_pretrained)")
    except SplitqError as e:  # user-fixable (every such class derives from it); a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{'part':>8} {'block':>5} {'init mse':>12} {'final mse':>12} {'seconds':>9}")
    for r in reports:
        print(f"{r.part:>8} {r.index:>5} {r.init_loss:>12.5g} {r.final_loss:>12.5g} {r.seconds:>9.1f}")
    print(f"\nwrote {path} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
