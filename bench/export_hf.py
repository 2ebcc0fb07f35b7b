"""The compressed-tensors export on real weights: transformers' perplexity on the exported
directory against ours on the checkpoint it came from.

    python bench/export_hf.py                       # qwen2.5-coder-0.5b, gptq w4a16 (group 128)
    python bench/export_hf.py --method rtn --bits w8a8 --samples 8

Steps (each resumes: a finished checkpoint or export under --work is reused):
1. ``scripts/calibrate.py`` quantizes the model (``--calib-samples`` code windows);
2. ``scripts/export_hf.py`` writes the HF directory;
3. on ``--samples`` held-out code windows of ``--max-tokens`` tokens, perplexity and logits from
   our runtime (``load_quantized``) and from ``transformers.AutoModelForCausalLM.from_pretrained``
   (float32, CPU) on the exported directory, with the same next-token NLL code for both.

Writes ``bench/results/export_hf-<machine>.json``: ppl_ours, ppl_transformers, their relative
difference, the logits' max relative difference and top-1 agreement, the export's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

BENCH = "export_hf"


def nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Next-token negative log-likelihoods ``(B, N-1)`` in float64."""
    x = logits[:, :-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(x, ids[:, 1:, None], -1)[..., 0]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", default="w4a16")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8, help="held-out code windows")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--work", default="runs/export_hf")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    machine = _common.machine_name()
    out = Path(args.out) if args.out else _common.RESULTS / f"{BENCH}-{machine}.json"
    name = f"{args.model}-{args.method}-{args.bits}"
    ckpt, hf_dir = Path(args.work) / name, Path(args.work) / f"{name}-hf"
    py = sys.executable
    t0 = time.time()
    if not (ckpt / "manifest.json").is_file():
        run([py, "scripts/calibrate.py", "--model", args.model, "--method", args.method, "--bits", args.bits,
             "--samples", str(args.calib_samples), "--max-tokens", str(args.max_tokens), "--out", str(ckpt),
             "--overwrite"])
    t_cal = time.time() - t0
    if not (hf_dir / "config.json").is_file():
        run([py, "scripts/export_hf.py", "--checkpoint", str(ckpt), "--out", str(hf_dir), "--overwrite"])
    t_exp = time.time() - t0 - t_cal

    import torch
    import transformers

    from splitq_jax import calib_data as cd
    from splitq_jax import evaluate as ev
    from splitq_jax.runtime import load_quantized

    qm = load_quantized(ckpt)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)  # the export's own tokenizer files
    windows = cd.code_samples(tok, split="eval", n=args.samples, max_tokens=args.max_tokens)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours_nll, theirs_nll, rel, agree = [], [], 0.0, []
    for batch in ev.eval_batches(windows, args.batch_size, qm.config.pad_token_id or 0):
        ids = np.asarray(batch["input_ids"])
        assert np.asarray(batch["attention_mask"]).all(), "code windows are full length"
        ours = np.asarray(qm.logits(batch), np.float32)
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
        ours_nll.append(nll(ours, ids))
        theirs_nll.append(nll(theirs, ids))
        rel = max(rel, float(np.abs(ours - theirs).max() / np.abs(ours).max()))
        agree.append(ours.argmax(-1) == theirs.argmax(-1))
    ppl_ours = float(np.exp(np.concatenate(ours_nll).mean()))
    ppl_theirs = float(np.exp(np.concatenate(theirs_nll).mean()))
    size = sum(f.stat().st_size for f in hf_dir.iterdir() if f.suffix == ".safetensors")
    base = dict(bench=BENCH, model=args.model, method=args.method, bits=args.bits, machine=machine,
                samples=args.samples, max_tokens=args.max_tokens)
    values = {"ppl_ours": ppl_ours, "ppl_transformers": ppl_theirs,
              "ppl_rel_diff": abs(ppl_theirs - ppl_ours) / ppl_ours, "logits_max_rel_diff": rel,
              "top1_agreement": float(np.mean(np.concatenate([a.ravel() for a in agree]))),
              "export_safetensors_bytes": size, "calibrate_s": round(t_cal, 1), "export_s": round(t_exp, 1)}
    records = [{**base, "metric": k, "value": v} for k, v in values.items()]
    records.append({**_common.run_record(BENCH, machine, transformers=transformers.__version__,
                                         compressed_tensors=__import__("compressed_tensors").__version__,
                                         torch=torch.__version__), "model": args.model, "method": args.method,
                    "bits": args.bits})
    # one file per machine: keep the other settings' records, replace this setting's
    key = (args.model, args.method, args.bits)
    old = json.loads(out.read_text()) if out.is_file() else []
    kept = [r for r in old if (r.get("model"), r.get("method"), r.get("bits")) != key]
    _common.write_json_atomic(out, kept + records)
    for k, v in values.items():
        print(f"{k:26s} {v}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
