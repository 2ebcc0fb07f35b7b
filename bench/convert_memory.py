"""Peak host memory of converting an HF checkpoint, as a multiple of the checkpoint's size.

Writes a synthetic Hugging Face Qwen2.5-VL checkpoint (``config.json``, sharded safetensors and
``model.safetensors.index.json``; random weights) of real 3B width: the full 151936 x 2048
embedding (tied LM head), ``--layers`` decoder layers (hidden 2048, intermediate 11008, 16 / 2
heads) and ``--vision-depth`` vision blocks (hidden 1280, intermediate 3420) plus the merger.
The default (9 layers, 8 blocks, bfloat16) is 2.4 GB. Shards are written one at a time with
``safetensors.numpy.save_file``, so writing never holds more than one shard.

Then, each in a fresh subprocess:

* ``baseline``: imports what a conversion imports (jax, flax, orbax, safetensors, the converters
  and models) and starts the jax backend; nothing that depends on the checkpoint;
* ``convert``: ``splitq_jax.models.converters.checkpoints.convert(ckpt, out, dtype=--dtype)`` (the whole of
  ``scripts/convert.py`` without ``--check``: load, then an orbax save).

The peak RSS of each is the kernel's high-water mark ``VmHWM``, read by the child itself at its
end (``ru_maxrss`` of that child from ``os.wait4`` is recorded beside it and agrees, since this
process stays small while the children run). It counts the file pages a process has mapped (a
reader that memory-maps the shards shows up here) as well as anonymous memory; a thread in the
child samples ``RssAnon`` / ``RssFile`` every few milliseconds for the breakdown. Reported:

* ``peak_rss_over_checkpoint``: convert peak / checkpoint bytes (goal <= 1.3);
* ``peak_rss_minus_baseline_over_checkpoint``: (convert peak - baseline peak) / checkpoint bytes;
* the bytes behind both, the sampled anonymous / file peaks, wall times.

Measured on 2 cores, default run: 1.93x before (memory-mapped shards held while read, and
orbax's 2 GiB OCDBT data files buffering the whole save), 1.20x after (1.11x over the baseline).

The checkpoint dtype and the conversion dtype are both ``--dtype``: converting a bfloat16
checkpoint to float32 doubles the output by definition, which says nothing about the converter.

Run from the repository root (about 2 minutes on 2 cores, 5 GB of free disk under ``--workdir``):
``python bench/convert_memory.py [--layers 9 --vision-depth 8 --dtype bfloat16 --shard-mb 1000]``.
The synthetic checkpoint and the converted output are deleted at the end (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

import numpy as np  # noqa: E402

BENCH = "convert_memory"
GOAL = 1.3

# Qwen2.5-VL-3B widths (hub config.json); depths are set per run.
TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
            num_key_value_heads=2)
VISION = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, in_chans=3,
              patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112)


# ---------------------------------------------------------------------------------------------
# Synthetic checkpoint


def hf_config(layers: int, vision_depth: int, dtype: str, text: dict = TEXT, vision: dict = VISION) -> dict:
    """A hub-layout (flat text keys, ``rope_scaling``) Qwen2.5-VL ``config.json``."""
    full_att = [i for i in (7, 15, 23, 31) if i < vision_depth] or [vision_depth - 1]
    half = text["hidden_size"] // text["num_attention_heads"] // 2  # rotary pairs per head
    rest = half - half // 4
    mrope = [half // 4, rest // 2, rest - rest // 2]  # [16, 24, 24] at head_dim 128
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope}, "tie_word_embeddings": True, "torch_dtype": dtype,
        "bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        **text, "num_hidden_layers": layers,  # after the token ids: a toy vocabulary brings its own
        "vision_config": {**vision, "depth": vision_depth, "fullatt_block_indexes": full_att,
                          "tokens_per_second": 2, "hidden_act": "silu"},
    }


def tensor_shapes(layers: int, vision_depth: int, text: dict = TEXT, vision: dict = VISION) -> dict[str, tuple]:
    """Hub tensor names and shapes of the synthetic model, in the order they are written."""
    h, inter, v = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    hd = h // text["num_attention_heads"]
    kv = text["num_key_value_heads"] * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                    p + "mlp.down_proj.weight": (h, inter)})
    out["model.norm.weight"] = (h,)
    vh, vi = vision["hidden_size"], vision["intermediate_size"]
    ps, tp, ch = vision["patch_size"], vision["temporal_patch_size"], vision["in_chans"]
    out["visual.patch_embed.proj.weight"] = (vh, ch, tp, ps, ps)
    for i in range(vision_depth):
        p = f"visual.blocks.{i}."
        out.update({p + "norm1.weight": (vh,), p + "norm2.weight": (vh,),
                    p + "attn.qkv.weight": (3 * vh, vh), p + "attn.qkv.bias": (3 * vh,),
                    p + "attn.proj.weight": (vh, vh), p + "attn.proj.bias": (vh,),
                    p + "mlp.gate_proj.weight": (vi, vh), p + "mlp.gate_proj.bias": (vi,),
                    p + "mlp.up_proj.weight": (vi, vh), p + "mlp.up_proj.bias": (vi,),
                    p + "mlp.down_proj.weight": (vh, vi), p + "mlp.down_proj.bias": (vh,)})
    merged = vh * vision["spatial_merge_size"] ** 2
    out.update({"visual.merger.ln_q.weight": (vh,),
                "visual.merger.mlp.0.weight": (merged, merged), "visual.merger.mlp.0.bias": (merged,),
                "visual.merger.mlp.2.weight": (vision["out_hidden_size"], merged),
                "visual.merger.mlp.2.bias": (vision["out_hidden_size"],)})
    return out


def write_checkpoint(path: Path, layers: int, vision_depth: int, dtype: str, shard_bytes: int, *,
                     text: dict = TEXT, vision: dict = VISION, seed: int = 0) -> int:
    """Write the synthetic checkpoint under ``path``; returns the bytes of tensor data."""
    from safetensors.numpy import save_file

    np_dtype = np.dtype(_np_dtype(dtype))
    shapes = tensor_shapes(layers, vision_depth, text, vision)
    # Group into shards the way save_pretrained does: in order, a new shard when the next tensor
    # would overflow the current one.
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf_config(layers, vision_depth, dtype, text, vision), indent=2))
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            # Normal(0, 0.02) (ones for norms); float32 draws, cast per tensor.
            x = rng.standard_normal(shapes[name], dtype=np.float32)
            x *= 0.02
            if "norm" in name or "ln_q" in name:
                x += 1.0
            shard[name] = x.astype(np_dtype, copy=False)
            del x
            total += shard[name].nbytes
            weight_map[name] = file
        save_file(shard, str(path / file), metadata={"format": "pt"})
        del shard
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def write_main(path: str, layers: int, vision_depth: int, dtype: str, shard_bytes: int) -> None:
    """:func:`write_checkpoint` as a subprocess body; prints one JSON line."""
    t0 = time.perf_counter()
    total = write_checkpoint(Path(path), layers, vision_depth, dtype, shard_bytes)
    print(json.dumps({"tensor_bytes": total, "wall_s": time.perf_counter() - t0}))


def _np_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float32


# ---------------------------------------------------------------------------------------------
# Child processes


def child_main(mode: str, ckpt: str, out: str, dtype: str) -> None:
    """Body of a measured subprocess; prints one JSON line with its own peaks."""
    peaks = {"anon": 0, "file": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            status = _proc_status()
            peaks["anon"] = max(peaks["anon"], status.get("RssAnon", 0))
            peaks["file"] = max(peaks["file"], status.get("RssFile", 0))
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    import jax
    import orbax.checkpoint  # noqa: F401  (imported lazily by the save; part of the baseline)
    import safetensors  # noqa: F401

    from splitq_jax.models.converters import checkpoints, hf, qwen2_5_vl  # noqa: F401
    from splitq_jax.models import qwen2_5_vl as model  # noqa: F401

    jax.devices()  # the backend start is a fixed cost too
    report = {}
    t0 = time.perf_counter()
    if mode == "convert":
        report = checkpoints.convert(ckpt, out, dtype=dtype)
    stop.set()
    sampler.join()
    status = _proc_status()
    print(json.dumps({"mode": mode, "convert_s": time.perf_counter() - t0, "vm_hwm": status["VmHWM"],
                      "sampled_anon_peak": peaks["anon"], "sampled_file_peak": peaks["file"],
                      "num_params": report.get("num_params")}))


def _proc_status() -> dict[str, int]:
    """``/proc/self/status`` memory lines, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith(("Vm", "Rss")):
                out[key] = int(value.split()[0]) * 1024
    return out


def run_child(call: str, log: Path) -> dict:
    """Run ``call`` (a call of a function of this module that prints one JSON line) in a fresh
    interpreter; its report plus ``ru_maxrss`` from ``wait4``.

    ``ru_maxrss`` survives ``fork`` + ``exec``: a child's value is at least the parent's RSS when it
    was spawned. This process therefore stays small (numpy only) until the children are done,
    and the checkpoint is written by a child too; ``VmHWM``, read by the child itself, is per
    address space and unaffected."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import convert_memory as m; m.{call}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(C.REPO)}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, cwd=C.REPO,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess {call} failed (exit {proc.returncode}):\n{text[-3000:]}")
    report = json.loads(text.strip().splitlines()[-1])
    report["ru_maxrss"] = usage.ru_maxrss * 1024  # Linux: KiB
    return report


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=9, help="decoder layers (3B width)")
    parser.add_argument("--vision-depth", type=int, default=8, help="vision blocks (3B width)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="checkpoint dtype and conversion dtype")
    parser.add_argument("--shard-mb", type=int, default=1000, help="largest shard, MB (10^6 bytes)")
    parser.add_argument("--min-gb", type=float, default=2.0, help="refuse a smaller checkpoint (10^9 bytes)")
    parser.add_argument("--workdir", default=None, help="where the checkpoint and the output go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    parser.add_argument("--out", default=None,
                        help="results JSON (default bench/results/convert_memory-<machine>.json)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="convert_memory-", dir=args.workdir))
    ckpt, out = work / "hf", work / "orbax"
    try:
        written = run_child(f"write_main({str(ckpt)!r}, {args.layers}, {args.vision_depth}, {args.dtype!r}, "
                            f"{args.shard_mb * 10**6})", work / "write.log")
        shards = sorted(ckpt.glob("*.safetensors"))
        ckpt_bytes = sum(p.stat().st_size for p in shards)
        if ckpt_bytes < args.min_gb * 1e9:
            raise SystemExit(f"checkpoint is {ckpt_bytes / 1e9:.2f} GB < --min-gb {args.min_gb}; add --layers")
        print(f"checkpoint: {ckpt_bytes / 1e9:.2f} GB in {len(shards)} shards ({written['wall_s']:.0f} s)",
              flush=True)
        base = run_child(f"child_main('baseline', {str(ckpt)!r}, {str(out)!r}, {args.dtype!r})",
                         work / "baseline.log")
        print(f"baseline: peak {base['vm_hwm'] / 1e9:.2f} GB", flush=True)
        conv = run_child(f"child_main('convert', {str(ckpt)!r}, {str(out)!r}, {args.dtype!r})",
                         work / "convert.log")
        expected_params = written["tensor_bytes"] // np.dtype(_np_dtype(args.dtype)).itemsize
        if conv["num_params"] != expected_params:
            raise RuntimeError(f"converted {conv['num_params']} parameters, the checkpoint has {expected_params}")
        out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    machine = C.machine_name()  # imports jax: only now, see run_child
    peak, base_peak = conv["vm_hwm"], base["vm_hwm"]
    raw, net = peak / ckpt_bytes, (peak - base_peak) / ckpt_bytes
    recipe = {"model": "qwen2.5-vl-3b-width", "layers": args.layers, "vision_depth": args.vision_depth,
              "dtype": args.dtype, "shards": len(shards), "checkpoint_bytes": ckpt_bytes}

    def rec(metric: str, value, unit: str) -> dict:
        return {"bench": BENCH, "metric": metric, "value": value, "unit": unit, "machine": machine, **recipe}

    records = [
        rec("peak_rss_over_checkpoint", raw, "ratio") | {"goal": GOAL, "meets_goal": raw <= GOAL},
        rec("peak_rss_minus_baseline_over_checkpoint", net, "ratio") | {"goal": GOAL, "meets_goal": net <= GOAL},
        rec("peak_rss_bytes", peak, "bytes") | {"ru_maxrss_bytes": conv["ru_maxrss"]},
        rec("baseline_peak_rss_bytes", base_peak, "bytes") | {"ru_maxrss_bytes": base["ru_maxrss"]},
        rec("sampled_anon_peak_bytes", conv["sampled_anon_peak"], "bytes"),
        rec("sampled_file_peak_bytes", conv["sampled_file_peak"], "bytes"),
        rec("convert_s", conv["convert_s"], "s"),
        rec("output_bytes", out_bytes, "bytes"),
    ]
    import flax
    import jax
    import orbax.checkpoint as ocp
    import safetensors

    records.append(C.run_record(BENCH, machine, jax=jax.__version__, flax=flax.__version__,
                                **{"orbax-checkpoint": ocp.__version__}, safetensors=safetensors.__version__,
                                write_checkpoint_s=written["wall_s"]))
    path = Path(args.out) if args.out else C.RESULTS / f"{BENCH}-{machine}.json"
    C.write_json_atomic(path, records)
    print(f"peak RSS {peak / 1e9:.2f} GB = {raw:.2f}x the checkpoint ({ckpt_bytes / 1e9:.2f} GB); "
          f"minus the {base_peak / 1e9:.2f} GB baseline: {net:.2f}x (goal <= {GOAL}); "
          f"sampled peaks anon {conv['sampled_anon_peak'] / 1e9:.2f} GB, "
          f"file {conv['sampled_file_peak'] / 1e9:.2f} GB; "
          f"convert {conv['convert_s']:.0f} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
