"""Bytes of a packed quantized decoder block over its bfloat16 bytes (issue goal at W4A4: <= 0.30).

    python bench/packed_bytes.py [--model-shape qwen2.5-vl-3b] [--bits w4a4,w3a3]

Folds one block of the real shape (random weights: sizes do not depend on values) for each method and
counts everything inference stores for its seven linears: packed words, scales, zero points, the
outlier-group weights, CWS / MAC factors, and the online transforms and biases (counted in bf16).
Writes ``bench/results/packed_bytes-<machine>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench._common import block_params, machine_name, run_record, write_json_atomic  # noqa: E402
from splitq_jax.methods import transform
from splitq_jax import calibrate as cal  # noqa: E402
from splitq_jax.block import GROUPS, BlockConfig  # noqa: E402
from splitq_jax.config import method_config  # noqa: E402
from splitq_jax.packing import PackedTensor, nbytes  # noqa: E402

LINEARS = [n for names in GROUPS.values() for n in names]


def stored_bytes(folded) -> dict[str, int]:
    """Bytes by kind: packed low-bit tensors, and float side data (transforms, biases) in bf16."""
    packed = side = 0
    for leaf in jax.tree_util.tree_leaves(folded["groups"], is_leaf=lambda t: isinstance(t, PackedTensor)):
        if isinstance(leaf, PackedTensor):
            packed += nbytes(leaf)
        elif jnp.issubdtype(leaf.dtype, jnp.floating):
            side += leaf.size * 2
    return {"packed": packed, "side": side}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="qwen2.5-vl-3b")
    ap.add_argument("--bits", default="w4a4,w3a3")
    ap.add_argument("--methods", default="rtn,flatquant,splitq")
    args = ap.parse_args(argv)
    from splitq_jax.models.qwen2_5_vl import get_config

    bcfg = BlockConfig.from_decoder(get_config(args.model_shape).text)
    params = block_params(bcfg)
    bf16 = sum(params[n]["w"].size * 2 for n in LINEARS)
    # Channel sets do not change sizes; the "random" selector avoids MOCD's cost at this width.
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 64, bcfg.hidden))
    cos, sin = jnp.ones((1, 64, bcfg.head_dim)), jnp.zeros((1, 64, bcfg.head_dim))
    mask = jnp.tril(jnp.ones((1, 64, 64), bool))
    modality = jnp.where(jnp.arange(64) < 32, 2, 1)[None]
    data = cal.make_block_data(params, x, cos, sin, mask, modality, bcfg)
    machine = machine_name()
    records = []
    print(f"{args.model_shape} block, bf16 bytes of the seven linears: {bf16 / 2**20:.1f} MiB")
    print(f"{'method':<10}{'bits':<6}{'packed/bf16':>12}{'side/bf16':>11}{'total/bf16':>12}")
    for bits in args.bits.split(","):
        for method in args.methods.split(","):
            t0 = time.time()
            cfg = method_config(method, bits, epochs=0, selector="random" if method == "splitq" else "none")
            stats = cal.collect_stats(params, data, cfg, bcfg)
            qp, qc = cal.init_qblock(jax.random.PRNGKey(0), params, stats, cfg, bcfg)
            b = stored_bytes(transform.fold_block(qp, qc, cfg))
            total = (b["packed"] + b["side"]) / bf16
            print(f"{method:<10}{bits:<6}{b['packed'] / bf16:>12.4f}{b['side'] / bf16:>11.4f}{total:>12.4f}")
            for metric, value in (("packed_over_bf16", b["packed"] / bf16), ("side_over_bf16", b["side"] / bf16),
                                  ("total_over_bf16", total), ("seconds", time.time() - t0)):
                records.append({"bench": "packed_bytes", "model": f"{args.model_shape}-block", "method": method,
                                "bits": bits, "metric": metric, "value": float(value), "machine": machine})
    records.append(run_record("packed_bytes", machine))
    out = Path(__file__).resolve().parent / "results" / f"packed_bytes-{machine}.json"
    write_json_atomic(out, records)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
