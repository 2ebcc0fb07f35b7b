"""The method registry and per-method configs (issue 12): one module per method, each with only
its own options, validated by the same class on the command line, in ``--config`` files and in
Python; every preset equal to the engine setting it replaces."""

from __future__ import annotations

import dataclasses
import json

import pytest

from splitq_jax import methods
from splitq_jax.config import BIT_PRESETS, COMPONENT_VARIANTS, METHODS, ConfigError, variant_config
from splitq_jax.methods.flatquant import FlatQuantConfig
from splitq_jax.methods.splitq import SplitqConfig
from test_calibrate import data  # noqa: F401  (fixture)
from test_cli import cli, run_cli


def test_registry_lists_every_method_and_variant():
    others = ("gptq", "gptaq", "vlm-ptq", "awq", "mbq", "tlq")  # methods that are no transform-engine setting
    assert tuple(methods.METHODS) == METHODS + others
    assert methods.names() == METHODS + others + ("flatquant+mocd", "flatquant+mocd+cws")
    assert set(methods.names()) == set(METHODS) | set(others) | set(COMPONENT_VARIANTS)
    for name in methods.METHODS:
        assert methods.get_method(name).config("w4a16").method == name
    with pytest.raises(ConfigError, match="unknown method 'nosuch': choose one of rtn, smoothquant"):
        methods.get_method("nosuch")


@pytest.mark.parametrize("name", list(dict.fromkeys(METHODS + tuple(COMPONENT_VARIANTS))))
@pytest.mark.parametrize("bits", BIT_PRESETS)
def test_every_preset_is_the_engine_setting_it_replaces(name, bits):
    assert methods.get_config(name, bits).engine_config() == variant_config(name, bits)
    overrides = {"seed": 3, "w_group_size": 16}
    assert methods.get_config(name, bits, **overrides).engine_config() == variant_config(name, bits, **overrides)


def test_configs_hold_only_their_own_options():
    own = {name: set(methods.option_names(m.config_class)) for name, m in methods.METHODS.items()}
    shared = {"w_symmetric", "a_symmetric", "w_group_size", "seed"}
    assert own["rtn"] == shared
    assert own["smoothquant"] == shared | {"smooth_alpha", "block_inputs", "weight_solver"}
    assert "weight_solver" in own["flatquant"] and "weight_solver" not in own["rtn"]  # rtn + gptq is --method gptq
    assert not own["flatquant"] & {"cws", "mac", "cws_ratio", "selector", "text_ratio"}
    assert own["flatquant"] < own["splitq"]  # SplitQ is FlatQuant plus MOCD and the branches
    assert {f.name for f in dataclasses.fields(SplitqConfig)} - {f.name for f in dataclasses.fields(FlatQuantConfig)} >= {
        "selector", "cws", "mac", "cws_ratio", "mac_ratio", "kmeans_starts"}
    cfg = methods.get_config("flatquant", "w3a3", epochs=2)
    assert isinstance(cfg, FlatQuantConfig) and cfg.bits == "w3a3" and cfg.epochs == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3


def test_option_of_another_method_is_refused_by_name():
    with pytest.raises(ConfigError) as e:
        methods.get_config("rtn", "w4a4", cws_ratio=0.1)
    assert "cws_ratio: not an option of rtn (cws_ratio belongs to splitq)" in str(e.value)
    assert "rtn's options: bits, w_symmetric, a_symmetric, w_group_size, seed" in str(e.value)
    with pytest.raises(ConfigError, match="lr belongs to flatquant, splitq"):
        methods.get_config("smoothquant", lr=0.1)
    with pytest.raises(ConfigError, match=r"lr \(--lr\) must be a finite number"):
        methods.get_config("flatquant", lr=float("nan"))


def test_help_shows_only_the_methods_flags(capsys):
    for name, absent, present in (("flatquant", ("--cws", "--mac-ratio", "--selector"), ("--lr", "--rotation-init")),
                                  ("rtn", ("--lr", "--smooth-alpha", "--cws"), ("--w-group-size", "--seed")),
                                  ("splitq", (), ("--cws-ratio", "--kmeans-starts", "--lr"))):
        with pytest.raises(SystemExit) as e:
            cli.main(["--method", name, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and f"{name} options" in out
        assert all(flag not in out for flag in absent), name
        assert all(flag in out for flag in present), name


@pytest.mark.parametrize("argv,config,message", [
    (["--method", "rtn", "--cws-ratio", "0.1"], None,
     "--cws-ratio 0.1: not an option of rtn (--cws-ratio is an option of splitq); rtn's options: --w-symmetric"),
    (["--method", "flatquant", "--mac"], None, "--mac: not an option of flatquant (--mac is an option of splitq)"),
    ([], {"method": "smoothquant", "epochs": 3}, "epochs: not an option of smoothquant (epochs belongs to flatquant, "
                                                  "splitq)"),
    ([], {"method": "flatquant", "learning_rate": 0.1}, "learning_rate: not an option of flatquant (learning_rate is no "
                                                        "option)"),
    ([], {"method": 3}, "method must be a name, got 3"),
    (["--method", "rtn"], {"method": "splitq", "cws_ratio": 0.1}, "cws_ratio: not an option of rtn"),
], ids=["flag-of-splitq", "bool-flag-of-splitq", "key-of-flatquant", "unknown-key", "method-not-a-name",
        "flag-beats-file-method"])
def test_foreign_options_fail_cleanly(argv, config, message, tmp_path, capsys):
    if config is not None:
        (tmp_path / "options.json").write_text(json.dumps(config))
        argv = [*argv, "--config", tmp_path / "options.json"]
    rc, err = run_cli([*argv, "--out", tmp_path / "ckpt"], capsys)
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["options.json"] if config is not None else [])


def test_variant_by_name_on_the_command_line(tmp_path, capsys, monkeypatch):
    """``--method flatquant+mocd`` is SplitQ without the branches; its options are SplitQ's."""
    from splitq_jax import quantize as qz

    seen = {}

    def stop(handle, cfg, out, vision_cfg=None):
        seen["cfg"] = cfg
        raise qz.QuantizeError("stop here")

    monkeypatch.setattr(qz, "load_model_for_calibration", lambda *a, **kw: object())
    monkeypatch.setattr(qz, "preflight_model", stop)
    rc, err = run_cli(["--method", "flatquant+mocd", "--bits", "w3a3", "--epochs", "2", "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "stop here" in err
    assert seen["cfg"] == variant_config("flatquant+mocd", "w3a3", epochs=2)


def test_pipeline_reaches_a_method_only_through_its_two_steps(data, monkeypatch):  # noqa: F811
    """The seam a new method plugs into: a method that is no transform-engine setting (its config
    has no ``engine_config``) registers, and the whole-model pipeline runs it by calling its
    ``calibrate_block`` then ``fold_block`` once per block and streaming on with its folded form."""
    import jax
    import numpy as np
    from dataclasses import dataclass, field

    from splitq_jax import pipeline
    from splitq_jax.methods import registry
    from splitq_jax.methods.base import Method, QuantSpec
    from test_calibrate import BCFG

    @dataclass(frozen=True, kw_only=True)
    class ToyConfig(QuantSpec):
        block_inputs: str = "quantized"
        method = "toy"

    @dataclass(frozen=True)
    class Toy(Method):
        calls: list = field(default_factory=list)

        def calibrate_block(self, block_params, data, cfg, bcfg, *, key=None, on_step=None):
            self.calls.append("calibrate")
            return methods.calibrate_block(block_params, data, methods.get_config("rtn", cfg.bits), bcfg, key=key)

        def fold_block(self, result, cfg, bcfg=None):
            self.calls.append("fold")
            return methods.fold_block(result, methods.get_config("rtn", cfg.bits), bcfg)

    toy = Toy("toy", ToyConfig, "RTN through the seam")
    monkeypatch.setitem(registry.METHODS, "toy", toy)
    assert not hasattr(ToyConfig(), "engine_config") and methods.method_of(ToyConfig()) is toy
    params, d = data
    stream = pipeline.Stream(d.x, d.cos, d.sin, d.mask, d.modality)
    got = pipeline.quantize_blocks([lambda: params] * 2, BCFG, stream, ToyConfig())
    assert toy.calls == ["calibrate", "fold"] * 2
    ref = pipeline.quantize_blocks([lambda: params] * 2, BCFG, stream, methods.get_config("rtn", "w4a4"))
    # block 0 reads the same inputs in both runs; block 1 reads the quantized stream in the toy run
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                  got.folded_blocks[0], ref.folded_blocks[0])
    assert all(jax.tree_util.tree_leaves(same))
    assert got.reports[1].init_loss != ref.reports[1].init_loss
