"""Block-level demo: calibrate one Qwen2-style decoder block with every method and compare.

    python scripts/demo_block.py [--bits w4a4] [--hidden 256] [--samples 8] [--tokens 128] [--epochs 3]

The block has random weights; its inputs are synthetic vision-language hidden states whose text and
vision tokens put their outliers in different channels (see ``bench/_common.py``). For each method
the block is calibrated, folded and packed; the table shows block-output MSE on held-out samples and
the stored bytes of the quantized linears relative to bfloat16. Runs offline on 2 CPU cores in a few
minutes. (The whole-model pipeline, ``scripts/calibrate.py``, replaces this demo when it lands.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench._common import block_params, rope_and_mask, synthetic_vl_inputs  # noqa: E402
from splitq_jax.methods import transform
from splitq_jax import calibrate as cal  # noqa: E402
from splitq_jax.quantized import fold  # noqa: E402
from splitq_jax.block import BlockConfig  # noqa: E402
from splitq_jax.config import method_config  # noqa: E402
from splitq_jax.packing import PackedTensor, nbytes  # noqa: E402


def packed_ratio(folded, block) -> float:
    """Stored bytes of the quantized linears (weights, scales, branches, outlier groups, transforms)
    over the bfloat16 bytes of the original seven weights."""
    stored = 0
    for leaf in jax.tree_util.tree_leaves(folded["groups"], is_leaf=lambda t: isinstance(t, PackedTensor)):
        if isinstance(leaf, PackedTensor):
            stored += nbytes(leaf)
        elif hasattr(leaf, "dtype") and leaf.dtype != jnp.int32:  # int32 = channel indices
            stored += leaf.size * 2  # online transforms / biases kept in bf16 at inference
    bf16 = sum(block[n]["w"].size * 2 for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return stored / bf16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--methods", default="rtn,smoothquant,flatquant,splitq")
    args = ap.parse_args(argv)

    bcfg = BlockConfig(hidden=args.hidden, intermediate=3 * args.hidden, num_heads=4, num_kv_heads=2)
    params = block_params(bcfg)
    cos, sin, mask = rope_and_mask(args.samples, args.tokens, bcfg.head_dim)

    def data(seed):
        x, modality, _ = synthetic_vl_inputs(args.samples, args.tokens, args.hidden, seed=seed)
        return cal.make_block_data(params, jnp.asarray(x), cos, sin, mask, modality, bcfg)

    train, held_out = data(seed=0), data(seed=1)
    print(f"block: hidden {bcfg.hidden}, intermediate {bcfg.intermediate}; {args.samples} samples x "
          f"{args.tokens} tokens; {args.bits}; {args.epochs} epochs")
    rows = []
    for method in args.methods.split(","):
        cfg = method_config(method, args.bits, epochs=args.epochs)
        t0 = time.time()
        steps = args.epochs * (args.samples // cfg.batch_size) if cfg.trains else 0
        with tqdm(total=steps, desc=f"{method:>11}", leave=False, disable=steps == 0) as bar:
            def on_step(_i, loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")

            r = cal.fit_block(params, train, cfg, bcfg, on_step=on_step)
        folded = transform.fold_block(r.qparams, r.qconsts, cfg)
        y = fold.folded_block_forward(folded, held_out.x, held_out.cos, held_out.sin, held_out.mask,
                                      held_out.modality, cfg, bcfg)
        mse = float(cal.block_mse(y, held_out.y, held_out.modality, cfg))
        rows.append((method, r.init_loss, r.final_loss, mse, packed_ratio(folded, params), time.time() - t0))

    print(f"\n{'method':<12}{'init mse':>12}{'calib mse':>12}{'held-out':>12}{'bytes/bf16':>12}{'time s':>9}")
    for m, i, f, h, b, t in rows:
        print(f"{m:<12}{i:>12.5g}{f:>12.5g}{h:>12.5g}{b:>12.3f}{t:>9.1f}")
    print("\nheld-out = block-output MSE of the folded, packed block on unseen samples (lower is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
