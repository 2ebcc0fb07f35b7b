"""Nothing silently broken (issue 13): bad values, unwritable outputs, over-long inputs, diverged runs.

Every refusal is checked for its exit status (2), its message (names the problem and the fix) and
that nothing was written. Runs that get past the model load use the tiny random Qwen2.5-VL of
``test_cli`` (``tiny``) in place of the embedded default, so they cost seconds; the two tests that
must run the real main job in a fresh process (a non-root-writable output, a memory limit) start
``scripts/calibrate.py`` as a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from splitq_jax import calibrate as cal
from splitq_jax import pipeline, preflight
from splitq_jax.quantized import export
from splitq_jax import quantize as qz
from splitq_jax.config import ConfigError, MethodConfig, method_config
from splitq_jax.errors import NonFiniteError, SplitqError
from test_cli import ROOT, run_cli, tiny, tiny_cfg, tree_snapshot  # noqa: F401  (tiny: a module fixture)

# ------------------------------------------------------------------ option values, when parsed


@pytest.mark.parametrize("field,value,message", [
    ("lr", float("nan"), "lr (--lr) must be a finite number >= 0.0, got nan"),
    ("lr", -1e-3, "lr (--lr) must be a finite number >= 0.0"),
    ("clip_lr", float("inf"), "clip_lr (--clip-lr) must be a finite number"),
    ("smooth_alpha", float("nan"), "smooth_alpha (--smooth-alpha) must be a finite number in [0.0, 1.0]"),
    ("smooth_alpha", 1.5, "smooth_alpha (--smooth-alpha) must be a finite number in [0.0, 1.0]"),
    ("text_ratio", float("nan"), "text_ratio (--text-ratio) must be a finite number in [0.0, 1.0)"),
    ("cws_ratio", 1.0, "cws_ratio (--cws-ratio) must be a finite number in [0.0, 1.0)"),
    ("mac_ratio", -0.1, "mac_ratio (--mac-ratio)"),
    ("weight_decay", -1.0, "weight_decay (--weight-decay)"),
    ("final_lr_ratio", 2.0, "final_lr_ratio (--final-lr-ratio)"),
    ("mac_gate_init", float("-inf"), "mac_gate_init (--mac-gate-init) must be a finite number"),
    ("loss_vision_weight", float("nan"), "loss_vision_weight (--loss-vision-weight)"),
    ("epochs", -1, "epochs (--epochs) must be an integer >= 0"),
    ("epochs", 1.5, "epochs (--epochs) must be an integer >= 0"),
    ("batch_size", 0, "batch_size (--batch-size) must be an integer >= 1"),
    ("n_clusters", 0, "n_clusters (--n-clusters) must be an integer >= 1"),
    ("kmeans_starts", 0, "kmeans_starts (--kmeans-starts) must be an integer >= 1"),
    ("w_group_size", 0, "w_group_size (--w-group-size) must be an integer >= 1"),
    ("seed", -1, "seed (--seed) must be an integer in [0, 2147483647]"),
    ("cws", "yes", "--cws must be true or false"),
])
def test_config_refuses_bad_numbers(field, value, message):
    with pytest.raises(ConfigError) as e:
        MethodConfig(**{field: value})
    assert message in str(e.value)


def test_config_refuses_weightless_loss():
    with pytest.raises(ConfigError, match="both 0"):
        method_config("flatquant", loss_text_weight=0.0, loss_vision_weight=0.0)
    method_config("flatquant", loss_text_weight=0.0)  # one modality alone is a valid choice


@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "lr (--lr) must be a finite number >= 0.0, got nan"),
    (["--smooth-alpha", "nan"], "smooth_alpha (--smooth-alpha) must be a finite number in [0.0, 1.0], got nan"),
    (["--clip-lr", "inf"], "clip_lr (--clip-lr) must be a finite number >= 0.0, got inf"),
    (["--calib-batch-size", "0"], "--calib-batch-size must be at least 1, got 0"),
    (["--max-tokens", "-5"], "--max-tokens must be at least 1, got -5"),
    (["--samples", "-1"], "--samples must be at least 1, got -1"),
], ids=["lr-nan", "alpha-nan", "clip-lr-inf", "calib-batch-0", "max-tokens-neg", "samples-neg"])
def test_cli_refuses_bad_numbers_before_anything(argv, message, tmp_path, capsys, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(qz, "load_model_for_calibration", no_model)
    rc, err = run_cli([*argv, "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_config_file_values_are_validated(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qz, "load_model_for_calibration", lambda *a, **kw: pytest.fail("model loaded"))
    for options, message in (({"lr": "fast"}, "lr (--lr) must be a finite number >= 0.0, got 'fast'"),
                             ({"epochs": True}, "epochs (--epochs) must be an integer >= 0, got True"),
                             ({"mac": "false"}, "--mac must be true or false, got 'false'")):
        config = tmp_path / "options.json"
        config.write_text(json.dumps(options))
        rc, err = run_cli(["--config", config, "--out", tmp_path / "ckpt"], capsys)
        assert rc == 2 and message in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["options.json"]


# ------------------------------------------------------------------ refusals after the model load


@pytest.fixture
def tiny_model(tiny, monkeypatch):
    """The CLI's model loader returns the tiny random Qwen2.5-VL (no tokenizer: the default data
    never gets that far in these tests)."""
    handle = tiny["qwen2_5_vl"][0]
    monkeypatch.setattr(qz, "load_model_for_calibration", lambda *a, **kw: handle)
    return handle


def test_group_size_refused_before_anything_is_written(tiny_model, tmp_path, capsys):
    d = tiny_model.model.config.text.hidden_size
    # a model given by path: its widths are known only once it is built (the tiny model here)
    rc, err = run_cli(["--model", "/nonexistent/hf-model", "--w-group-size", "7", "--out", tmp_path / "sub" / "ckpt"],
                      capsys)
    assert rc == 2 and "--w-group-size 7 does not divide the language weight widths" in err, err
    assert f"attn_in {d}" in err and "use a common divisor" in err
    assert list(tmp_path.iterdir()) == []  # neither <out>, <out>.work nor the parent directory


def test_group_size_of_a_named_model_refused_before_it_loads(tmp_path, capsys, monkeypatch):
    """The embedded default's and the named configs' widths are known without their weights."""
    monkeypatch.setattr(qz, "load_model_for_calibration", lambda *a, **kw: pytest.fail("model loaded"))
    for model, widths in ((None, "attn_in 128, attn_out 128, mlp_in 128, mlp_out 384"),
                          ("qwen2.5-vl-3b", "attn_in 2048, attn_out 2048, mlp_in 2048, mlp_out 11008")):
        rc, err = run_cli([*(["--model", model] if model else []), "--w-group-size", "3000", "--out",
                           tmp_path / "ckpt"], capsys)
        assert rc == 2 and f"does not divide the language weight widths ({widths})" in err, err
    assert list(tmp_path.iterdir()) == []


def test_group_size_counts_the_gathered_main_width(tiny):
    """On the gathered path the main weight is d - k_t - k_v wide, so a divisor of d can fail there."""
    handle = tiny["qwen2_5_vl"][0]
    params = handle.model.blocks[0].block_params()
    groups = pipeline.block_config_of(handle.model.config.text).groups
    widths = preflight.group_widths(params, groups)
    g = math.gcd(*widths.values())
    cfg = method_config("splitq", w_group_size=g)  # masked path: every main weight is d or I wide
    preflight.check_group_size(params, groups, cfg)
    with pytest.raises(preflight.PreflightError, match="attn_in"):
        preflight.check_group_size(params, groups, cfg.replace(main_path="gathered"))


def test_disk_space_checked_before_anything_is_written(tiny_model, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    rc, err = run_cli(["--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and "not enough disk space" in err and "GB free" in err, err
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qz, "load_model_for_calibration", lambda *a, **kw: pytest.fail("model loaded"))
    (tmp_path / "afile").write_text("x")
    before = tree_snapshot(tmp_path)
    rc, err = run_cli(["--out", tmp_path / "afile" / "ckpt"], capsys)
    assert rc == 2 and "is a file, not a directory" in err, err
    assert tree_snapshot(tmp_path) == before


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv to drop a capability")
def test_unwritable_output_refused_before_the_model_loads(tmp_path):
    """Root ignores permission bits, so the run drops CAP_DAC_OVERRIDE (setpriv) and then cannot
    write into a read-only directory, as a non-root user could not."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable,
           str(ROOT / "scripts" / "calibrate.py"), "--samples", "1", "--out", str(locked / "runs" / "ckpt")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{locked} is not writable (Permission denied)" in r.stderr
    assert "choose a --out in a directory you can write" in r.stderr
    assert "Traceback" not in r.stderr and "loaded" not in r.stdout
    assert list(locked.iterdir()) == []


# ------------------------------------------------------------------ non-finite values never saved


def test_nan_input_batch_never_writes_a_checkpoint(tiny, tmp_path):
    handle, _, stream = tiny["qwen2_5_vl"]
    x = np.asarray(stream.x).copy()
    x[1, 3, :5] = np.nan
    bad = pipeline.Stream(jnp.asarray(x), stream.cos, stream.sin, stream.mask, stream.modality)
    with pytest.raises(NonFiniteError, match="block 0: calibration inputs contain NaN or inf"):
        qz.quantize_model(handle, bad, tiny_cfg("rtn"), tmp_path / "out" / "ckpt", data_record={})
    assert list(tmp_path.iterdir()) == []


def test_diverging_learning_rate_never_writes_a_checkpoint(tiny, tmp_path):
    handle, _, stream = tiny["qwen2_5_vl"]
    cfg = tiny_cfg("flatquant").replace(lr=1e30, clip_lr=1e30)
    with pytest.raises(NonFiniteError) as e:
        qz.quantize_model(handle, stream, cfg, tmp_path / "ckpt", data_record={})
    msg = str(e.value)
    assert msg.startswith("block 0: ") and "lower the learning rates (--lr 1e+30" in msg, msg
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_state_names_the_group():
    cfg = method_config("flatquant")
    good = {"attn_in": {"c": jnp.ones(3)}, "mlp_in": {"c": jnp.ones(3)}}
    cal.check_state(good, {"norms": {}}, 0.5, cfg, trained=True)
    bad = {"attn_in": {"c": jnp.ones(3)}, "mlp_in": {"c": jnp.array([1.0, jnp.inf, 1.0])}}
    with pytest.raises(NonFiniteError, match=r"group mlp_in holds non-finite values \(at mlp_in/c\).*--lr"):
        cal.check_state(bad, {"norms": {}}, 0.5, cfg, trained=True)
    with pytest.raises(NonFiniteError, match="loss after calibration is nan"):
        cal.check_state(good, {"norms": {}}, float("nan"), cfg, trained=True)


def test_export_refuses_nonfinite_trees(tiny, tmp_path):
    """The last line of defence: neither a block nor a checkpoint with a NaN is ever written."""
    handle, _, stream = tiny["qwen2_5_vl"]
    cfg = tiny_cfg("rtn")
    result = pipeline.quantize_decoder(handle.model, stream, cfg)
    blocks = [jax.tree_util.tree_map(lambda a: a, b) for b in result.folded_blocks]
    first = blocks[0]["norms"] if "norms" in blocks[0] else blocks[0]
    leaf_path, leaf = next((p, v) for p, v in jax.tree_util.tree_flatten_with_path(first)[0]
                           if jnp.issubdtype(v.dtype, jnp.floating))
    poisoned = jax.tree_util.tree_map(lambda v: v.at[(0,) * v.ndim].set(jnp.nan) if v is leaf else v, first)
    if "norms" in blocks[0]:
        blocks[0] = {**blocks[0], "norms": poisoned}
    else:
        blocks[0] = poisoned
    with pytest.raises(NonFiniteError, match="nothing was written"):
        export.save_block(tmp_path / "block_000", blocks[0])
    with pytest.raises(NonFiniteError, match="the checkpoint for .* holds non-finite values"):
        export.save_quantized(tmp_path / "ckpt", family="qwen2_5_vl", model_config=handle.model.config,
                              fp_params=handle.model, folded_blocks=blocks, method_config=cfg)
    assert list(tmp_path.iterdir()) == []


def test_refusal_is_a_splitq_error():
    """The CLIs catch SplitqError; every user-fixable error class derives from it."""
    from splitq_jax.models.converters.hf import ConversionError
    from splitq_jax.calib_data import CalibDataError
    from splitq_jax.quant import QuantError

    for cls in (ConfigError, NonFiniteError, preflight.PreflightError, qz.QuantizeError, CalibDataError,
                QuantError, ConversionError, export.CheckpointError):
        assert issubclass(cls, SplitqError), cls


# ------------------------------------------------------------------ over-long inputs, bounded memory


def _long_jsonl(tmp_path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "ok.png")
    data = tmp_path / "calib.jsonl"
    lines = [{"image": "ok.png", "prompt": "What colour is this?", "answer": "grey"},
             {"image": "ok.png", "prompt": "word " * 20000 + "?", "answer": "grey"}]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return data


def _run_limited(argv: list[str], limit_gb: float) -> subprocess.CompletedProcess:
    """``scripts/calibrate.py argv`` in a fresh process whose address space is capped (RLIMIT_AS).

    The cap is set by the child itself before it runs the script (no ``preexec_fn``: forking a
    multithreaded JAX process to run Python code is unsafe)."""
    limit = int(limit_gb * 2**30)
    script = str(ROOT / "scripts" / "calibrate.py")
    launcher = ("import resource, runpy, sys; "
                f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
                f"sys.argv = [{script!r}, *sys.argv[1:]]; runpy.run_path({script!r}, run_name='__main__')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    return subprocess.run([sys.executable, "-c", launcher, *argv], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow  # ~20 s: two capped CLI processes; test_cli's over-long bad-data case is the fast twin
def test_over_long_sample_is_refused_under_a_memory_limit(tmp_path):
    """A 100,000-character prompt (~20k tokens) under a 6 GB address-space cap: by default the
    sample is refused by its file and line; with the cap raised past it (--max-tokens), the memory
    estimate refuses the run before it starts. Either way: exit 2, a clear message, nothing
    written, and never the kernel's or XLA's out-of-memory kill."""
    data = _long_jsonl(tmp_path)
    out = tmp_path / "runs" / "ckpt"
    r = _run_limited(["--calib-data", str(data), "--samples", "2", "--out", str(out)], 6)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{data}:2: the sample is " in r.stderr and "tokens long, more than the 2048-token limit" in r.stderr
    assert "--max-tokens" in r.stderr and "Traceback" not in r.stderr
    r = _run_limited(["--calib-data", str(data), "--samples", "2", "--max-tokens", "100000", "--out", str(out)], 6)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "calibrating 2 samples of up to" in r.stderr and "GB of memory but only" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "ok.png"]


def test_memory_estimate_grows_with_the_square_of_the_length():
    kw = dict(samples=4, hidden=896, intermediate=4864, num_heads=14, head_dim=64, batch_size=4)
    short, long = preflight.run_memory(tokens=1024, **kw), preflight.run_memory(tokens=16384, **kw)
    assert long > 100 * short  # 16x the length: the N^2 terms dominate
    with pytest.raises(preflight.PreflightError, match="needs about .* GB of memory but only 1.0 GB"):
        preflight.check_memory(long, "calibrating", "lower --max-tokens", available=2**30)
    preflight.check_memory(short, "calibrating", "lower --max-tokens", available=64 * 2**30)


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluate_json_output_checked_before_loading(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    before = tree_snapshot(tmp_path)
    rc = _script("evaluate").main(["--checkpoint", str(tmp_path / "nope"), "--json", str(tmp_path / "afile" / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file, not a directory; choose another --json" in err, err
    assert tree_snapshot(tmp_path) == before


def test_plot_channels_refuses_bad_input_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qz, "load_model_for_calibration", lambda *a, **kw: pytest.fail("model loaded"))
    plot = _script("plot_channels")
    (tmp_path / "afile").write_text("x")
    before = tree_snapshot(tmp_path)
    for argv, message in ((["--samples", "0"], "--samples must be at least 1, got 0"),
                          (["--out", str(tmp_path / "afile" / "c.png")], "is a file, not a directory"),
                          (["--method", "nosuch"], "unknown method 'nosuch'")):
        rc = plot.main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err, err
    assert tree_snapshot(tmp_path) == before

