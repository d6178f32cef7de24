"""Config loading: every shipped file loads; bad keys, types and ranges are named clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from qdiff.config import ConfigError, RunConfig, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.name == path.stem
    assert config.run_dir == Path("runs") / path.stem


def test_extends_inherits_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("quant: {weight_bits: 3, act_bits: 5}\nlora: {rank: 4}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nquant: {act_bits: 8}\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.quant.weight_bits, config.quant.act_bits, config.lora.rank) == (3, 8, 4)


def test_variants_differ_from_base_only_in_bits():
    w4a4 = load_config(CONFIGS[0].parent / "tiny-ldm-w4a4.yaml")
    w8a8 = load_config(CONFIGS[0].parent / "tiny-ldm-w8a8.yaml")
    assert (w8a8.quant.weight_bits, w8a8.quant.act_bits) == (8, 8)
    assert w8a8.quant.overrides == w4a4.quant.overrides
    assert w8a8.distill == w4a4.distill


def test_command_line_overrides_win():
    config = load_config(CONFIGS[0].parent / "tiny-ldm-w4a4.yaml",
                         ["quant.act_bits=8", "distill.lr=0.01", "name=custom"])
    assert config.quant.act_bits == 8
    assert config.distill.lr == pytest.approx(0.01)
    assert config.name == "custom"


@pytest.mark.parametrize("overrides, message", [
    (["quant.wieght_bits=4"], "Unknown config key 'quant.wieght_bits'. Did you mean 'quant.weight_bits'?"),
    (["modle.path=x"], "Unknown config key 'modle'. Did you mean 'model'?"),
    (["quant.overrides=[{pattern: conv_in, wbits: 8}]"],
     "Unknown config key 'quant.overrides[0].wbits'. Did you mean 'quant.overrides[0].weight_bits'?"),
    (["quant.weight_bits=four"], "quant.weight_bits: Value 'four' of type 'str' could not be converted to Integer"),
    (["distill.eta=high"], "distill.eta: Value 'high' of type 'str' could not be converted to Float"),
    (["quant.weight_bits=9"], "quant.weight_bits=9 is out of range; allowed: 2..8."),
    (["quant.act_bits=1"], "quant.act_bits=1 is out of range; allowed: 2..8."),
    (["lora.rank=0"], "lora.rank=0 is out of range; allowed: >= 1."),
    (["distill.eta=1.5"], "distill.eta=1.5 is out of range; allowed: 0.0..1.0."),
    (["quant.overrides=[{pattern: conv_in, act_bits: 12}]"],
     "quant.overrides[conv_in].act_bits=12 is out of range; allowed: 2..8."),
    (["quant.act_mode=dynamic"], "quant.act_mode='dynamic' is not allowed; choose one of "
                                 "['temporal', 'dynamic_per_token']. Did you mean 'dynamic_per_token'?"),
    (["eval.metrics=[fid,FID2]"], "eval.metrics='FID2' is not allowed"),
    (["quant.weight_bits"], "Override 'quant.weight_bits' is not of the form key=value"),
    (["distill.checkpoint_every=30"],
     "distill.checkpoint_every=30 must be a multiple of distill.trajectory_steps=100 when "
     "distill.walker='student'"),
    (["distill.walker=pupil"], "distill.walker='pupil' is not allowed"),
    (["distill.ema_decay=1"], "distill.ema_decay=1.0 is out of range; allowed: 0 (no average) "
                              "or a decay in (0, 1), e.g. 0.995."),
    (["distill.ema_ramp=1.5"], "distill.ema_ramp=1.5 would weight the first steps most; "
                               "allowed: 2 (every step alike) or more, e.g. 10."),
    (["distill.base_weight_lr=1e-5", "quant.packed_base_weight=true"],
     "Set quant.packed_base_weight=false for full QAT, or distill.base_weight_lr=0."),
])
def test_bad_values_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("distill:\n  stpes: 10\n")
    with pytest.raises(ConfigError, match=r"'distill.stpes'. Did you mean 'distill.steps'\?"):
        load_config(path)


def test_missing_file_and_extends_cycle(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_dataclasses_validate_when_built_in_python():
    from qdiff.config import QuantConfig

    with pytest.raises(ConfigError, match="quant.weight_bits=16"):
        QuantConfig(weight_bits=16)


def test_saved_config_reloads_identically(tmp_path):
    config = load_config(CONFIGS[0].parent / "tiny-ldm-w4a4.yaml", ["lora.rank=4"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config
