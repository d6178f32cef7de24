"""Config loading: every shipped file loads; bad keys, types and ranges are named clearly."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from qdiff import config as config_module
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


@pytest.mark.parametrize("text, message", [
    ("quant:\n  weight_bits: [4\n", ("bad.yaml, line 3, column 1: not valid YAML (expected ',' "
                                     "or ']', but got '<stream end>'); fix the syntax there")),
    ("quant:\n\tweight_bits: 4\n", ("bad.yaml, line 2, column 1: not valid YAML (found "
                                     "character '\\t' that cannot start any token)")),
    ("model: !!python/object:os.system {}\n", "bad.yaml, line 1, column 8: not valid YAML"),
    ("quant: 4\n", ("bad.yaml: 'quant' must be a block of keys, got 4; write 'quant:' "
                    "followed by indented `key: value` lines")),
    ("quant:\n  overrides: conv_in\n", ("bad.yaml: 'quant.overrides' must be a list of blocks "
                                        "of keys, got 'conv_in'")),
    ("- quant\n", "bad.yaml: expected a mapping of config blocks at the top level."),
    ("extends: 5\n", "bad.yaml: extends=5 must be the path of another YAML file"),
])
def test_a_malformed_yaml_file_is_one_line_naming_the_file_and_where(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "bad.yaml")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_config_that_is_not_utf8_is_named_and_the_fix_given(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 9: invalid "
                                          r"continuation byte\); save the config as UTF-8 YAML."):
        load_config(tmp_path / "latin1.yaml")


def test_a_block_given_as_one_value_in_an_override_is_refused():
    with pytest.raises(ConfigError, match="'quant' must be a block of keys, got 4"):
        load_config(None, ["quant=4"])


def _float_fields() -> list[tuple[str, type, str]]:
    """(block, dataclass, field) for every float field of every block of RunConfig."""
    found = []
    for block in dataclasses.fields(RunConfig):
        schema = typing.get_type_hints(RunConfig)[block.name]
        if not dataclasses.is_dataclass(schema):
            continue
        for name, hint in typing.get_type_hints(schema).items():
            if float in (hint, *typing.get_args(hint)):
                found.append((block.name, schema, name))
    return found


def test_the_float_field_table_covers_the_blocks_that_have_floats():
    blocks = {block for block, _, _ in _float_fields()}
    assert {"quant", "distill", "eval"} <= blocks
    assert ("distill", config_module.DistillConfig, "ema_ramp") in _float_fields()


@pytest.mark.parametrize("block, schema, name", _float_fields(),
                         ids=[f"{b}.{n}" for b, _, n in _float_fields()])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_field_refuses_a_value_that_is_not_finite(block, schema, name, value):
    message = f"{block}.{name}={float(value)} is not a finite number; give a number"
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [f"{block}.{name}={value}"])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        schema(**{name: float(value)})
