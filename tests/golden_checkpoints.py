"""Golden checkpoints: the exported bits of every method on the tiny Qwen2.5-VL, pinned.

Restructuring the method code must not change a single output bit. This module records, for
``rtn``, ``smoothquant``, ``flatquant``, ``splitq`` and the ``flatquant+mocd`` variant on the tiny
random Qwen2.5-VL of ``test_cli`` (seed 0, three epochs of batch 2, W4A4):

* the path, dtype and shape of every array of the exported checkpoint (any machine);
* the sha256 of every array and of the logits of ``load_quantized`` on a fixed batch (per machine:
  XLA:CPU compiles for the host's instruction set, so float round-off, and with it a rounding
  decision here and there, may differ between CPUs);
* the logits themselves (``golden_logits.npz``).

``tests/test_cli.py::test_checkpoint_bits_unchanged`` compares a fresh run with the record:
exactly (every hash) on a machine whose fingerprint was recorded, and otherwise the structure
exactly and the logits to within 2% of their largest magnitude.

Record (only before a change that is *meant* to change outputs, and say so in the commit)::

    .venv/bin/python tests/golden_checkpoints.py
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN_JSON = HERE / "golden" / "checkpoints.json"
GOLDEN_LOGITS = HERE / "golden" / "logits.npz"
CASES = ("rtn", "smoothquant", "flatquant", "splitq", "flatquant+mocd")
# Flags that change what XLA:CPU's code generator emits for float arithmetic.
_ISA_FLAGS = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl",
              "avx512_bf16", "avx512_fp16", "avx512vnni", "amx_tile", "amx_bf16", "neon", "asimd", "sve"}


def fingerprint() -> str:
    """Machine + CPU model + instruction-set flags + core count + jax/jaxlib versions + the XLA
    flags (code-generation settings such as ``--xla_cpu_use_fusion_emitters`` change float round-off)."""
    import jaxlib

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = sorted(set((info.get("flags") or info.get("Features") or "").split()) & _ISA_FLAGS)
    return " | ".join([platform.machine(), info.get("vendor_id", "?"), info.get("model name", "?"),
                       f"{os.cpu_count()} cpus", f"jax {jax.__version__}", f"jaxlib {jaxlib.__version__}",
                       ",".join(flags), f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"])


def _leaves(prefix: str, tree) -> dict[str, np.ndarray]:
    from splitq_jax.finite import path_str

    return {f"{prefix}/{path_str(p)}": np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def digest(path: Path, batch: dict) -> dict:
    """``{"structure": {array: "dtype shape"}, "hashes": {array: sha256}, "logits": array}``."""
    from splitq_jax.quantized import export
    from splitq_jax.runtime import load_quantized

    _, fp, blocks, vision = export.load_quantized_parts(path)
    arrays = _leaves("fp", fp)
    for i, b in enumerate(blocks):
        arrays.update(_leaves(f"blocks/{i}", b))
    for i, b in enumerate(vision or []):
        arrays.update(_leaves(f"vision_blocks/{i}", b))
    logits = np.asarray(load_quantized(path).logits(batch), np.float32)

    def sha(a: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

    return {"structure": {k: f"{a.dtype} {list(a.shape)}" for k, a in sorted(arrays.items())},
            "hashes": {**{k: sha(a) for k, a in sorted(arrays.items())}, "logits": sha(logits)},
            "logits": logits}


def check(case: str, got: dict) -> str:
    """Compare one case with the record; returns which comparison ran ("exact" or "tolerance")."""
    golden = json.loads(GOLDEN_JSON.read_text())
    assert got["structure"] == golden["structure"][case], f"{case}: arrays, dtypes or shapes changed"
    machine = golden["machines"].get(fingerprint())
    if machine is not None:
        want = machine[case]
        changed = sorted(k for k in want if got["hashes"].get(k) != want[k])
        assert not changed, f"{case}: {len(changed)} arrays changed bits, e.g. {changed[:5]}"
        return "exact"
    ref = np.load(GOLDEN_LOGITS)[case]
    err = float(np.max(np.abs(got["logits"] - ref)))
    assert err <= 0.02 * float(np.max(np.abs(ref))), f"{case}: logits moved by {err:.3g} on this machine"
    return "tolerance"


def record() -> None:
    """Quantize every case as ``test_cli``'s tiny runs do and write the record for this machine
    (the structure and logits of other machines' records must agree: they are one recipe)."""
    sys.path.insert(0, str(HERE))
    from test_cli import make_tiny, tiny_cfg

    from splitq_jax import quantize as qz

    handle, batches, stream = make_tiny()["qwen2_5_vl"]
    golden = json.loads(GOLDEN_JSON.read_text()) if GOLDEN_JSON.exists() else {"structure": {}, "machines": {}}
    machine, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            path, _ = qz.quantize_model(handle, stream, tiny_cfg(case), Path(tmp) / case, data_record={"source": "synthetic"})
            d = digest(path, batches[0])
            golden["structure"][case] = d["structure"]
            machine[case] = d["hashes"]
            logits[case] = d["logits"]
            print(f"{case}: {len(d['hashes']) - 1} arrays")
    golden["machines"][fingerprint()] = machine
    golden["recipe"] = "test_cli.tiny_cfg(case) on test_cli.make_tiny()['qwen2_5_vl'] (seed 0); logits of batch 0"
    GOLDEN_JSON.parent.mkdir(exist_ok=True)
    GOLDEN_JSON.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(GOLDEN_LOGITS, **logits)
    print(f"wrote {GOLDEN_JSON} and {GOLDEN_LOGITS} for {fingerprint()}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the same XLA settings as the test suite (tests/conftest.py), so the recorded bits are the tested ones
    sys.path.insert(0, str(HERE))
    import conftest  # noqa: F401

    record()
