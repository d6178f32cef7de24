"""quantize_ on tiny random diffusers denoisers of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qdiff.config import AuxConfig, LayerOverride, LoRAConfig, QuantConfig
from qdiff.quant import (QuantLayer, RankDecay, TemporalActQuantizer, act_param_groups, calibrating,
                         iter_quant_layers, lora_param_groups, mean_weight_steps, merge_lora, quant_parameters, quantize_, timestep_context)


pytestmark = pytest.mark.usefixtures("one_thread")


T = torch.tensor([10, 700])


def _unet2d():
    from diffusers import UNet2DModel

    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                        attention_head_dim=4)
    return model.eval(), (torch.randn(2, 3, 8, 8), T), {}


def _unet_cond():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                 cross_attention_dim=12, norm_num_groups=4, attention_head_dim=4)
    return model.eval(), (torch.randn(2, 4, 8, 8), T), {"encoder_hidden_states": torch.randn(2, 5, 12)}


def _dit():
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4,
                                  out_channels=4, num_layers=1, norm_num_groups=4, sample_size=8,
                                  patch_size=2, num_embeds_ada_norm=10)
    return model.eval(), (torch.randn(2, 4, 8, 8),), {"timestep": T, "class_labels": torch.tensor([1, 3])}


def _wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                  in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=16,
                                  num_layers=1, rope_max_seq_len=32)
    return model.eval(), (torch.randn(2, 4, 2, 8, 8), T, torch.randn(2, 5, 12)), {}


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                        out_channels=4, time_embed_dim=8, text_embed_dim=12, num_layers=1,
                                        sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                        max_text_seq_length=5)
    # timestep is the third positional argument here: the hook finds it by name
    return model.eval(), (torch.randn(2, 3, 4, 8, 8), torch.randn(2, 5, 12), T), {}


# family -> (builder, a layer to exclude, a layer to override, expected kept by _keep_in_fp32_modules)
FAMILIES = {
    "unet2d": (_unet2d, "conv_out", "time_embedding.linear_1", []),
    "sd-unet": (_unet_cond, "conv_out", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", []),
    "dit": (_dit, "proj_out_2", "transformer_blocks.0.attn1.to_q", []),
    "wan": (_wan, "proj_out", "blocks.0.ffn.net.2",
            ["condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2"]),
    "cogvideox": (_cogvideox, "proj_out", "patch_embed.proj", []),
}
LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.Conv3d)


def _output(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_swaps_layers_and_stays_close_at_8_bits(family):
    build, excluded, overridden, kept_fp32 = FAMILIES[family]
    torch.manual_seed(0)
    model, args, kwargs = build()
    reference = _output(model, args, kwargs)
    candidates = [n for n, m in model.named_modules() if type(m) in LAYER_TYPES]
    student = copy.deepcopy(model)
    cfg = QuantConfig(weight_bits=8, act_bits=8, exclude=[excluded],
                      overrides=[LayerOverride(pattern=overridden, weight_bits=6, act_bits=7),
                                 LayerOverride(pattern="*", weight_bits=5)])
    report = quantize_(student, cfg, LoRAConfig(rank=2))
    modules = dict(student.named_modules())

    assert sorted(row.name for row in report) == sorted(candidates)
    kept = {row.name: row.note for row in report.kept_float}
    assert kept == {excluded: "excluded", **{name: "_keep_in_fp32_modules" for name in kept_fp32}}
    for name in candidates:
        assert isinstance(modules[name], QuantLayer) == (name not in kept)
        assert type(modules[name]) in LAYER_TYPES or name not in kept
    assert (modules[overridden].weight_bits, modules[overridden].act_bits) == (6, 7)
    assert report.row(overridden).note == f"override '{overridden}'"
    others = [layer for name, layer in iter_quant_layers(student) if name != overridden]
    assert {(layer.weight_bits, layer.act_bits) for layer in others} == {(5, 8)}  # first match wins

    with calibrating(student):
        _output(student, args, kwargs)
    assert timestep_context(student).timesteps.tolist() == T.float().tolist()
    out = _output(student, args, kwargs)
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.1

    table = str(report)
    assert all(name in table for name in candidates)
    assert f"{len(report.quantized)} quantized layers" in table


@pytest.mark.parametrize("family", ["dit", "wan"])
def test_dynamic_per_token_mode_on_transformers(family):
    build = FAMILIES[family][0]
    torch.manual_seed(0)
    model, args, kwargs = build()
    reference = _output(model, args, kwargs)
    quantize_(model, QuantConfig(weight_bits=8, act_bits=8, act_mode="dynamic_per_token"))
    with calibrating(model):
        _output(model, args, kwargs)
    error = ((_output(model, args, kwargs) - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.1


def test_include_patterns_select_layers_and_quantize_twice_skips_wrapped_layers():
    torch.manual_seed(0)
    model, _, _ = _dit()
    report = quantize_(model, QuantConfig(include=["transformer_blocks.*"]))
    assert report.quantized and all(r.name.startswith("transformer_blocks.") for r in report.quantized)
    assert {r.note for r in report.kept_float} == {"not included"}
    again = quantize_(model, QuantConfig(include=["*"]))
    assert not any(".base_layer" in row.name for row in again)
    assert {row.name for row in again} == {r.name for r in report.kept_float}
    assert len(model._forward_pre_hooks) == 1


def test_parameter_groups_and_scale_aware_lora_learning_rates():
    torch.manual_seed(0)
    model, args, kwargs = _dit()
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4), LoRAConfig(rank=2))
    with calibrating(model):
        _output(model, args, kwargs)
    layers = dict(iter_quant_layers(model))
    params = quant_parameters(model)
    assert len(params.lora) == 2 * len(layers)
    assert len(params.weight_scales) == len(params.act_scales) == len(layers)
    assert params.aux == []
    steps = mean_weight_steps(model)
    groups = lora_param_groups(model, lr=1e-3)
    assert len(groups) == len(layers)
    by_name = {g["name"][len("lora:"):]: g["lr"] for g in groups}
    mean_step = sum(steps.values()) / len(steps)
    for name, lr in by_name.items():
        assert lr == pytest.approx(1e-3 * steps[name] / mean_step)
    assert sum(by_name.values()) / len(by_name) == pytest.approx(1e-3)
    assert {g["lr"] for g in lora_param_groups(model, lr=1e-3, scale_aware=False)} == {1e-3}


def _act_tables(model: nn.Module) -> dict:
    return {name: module.scale for name, module in model.named_modules()
            if isinstance(module, TemporalActQuantizer)}


def test_scale_aware_act_rates_move_every_step_table_by_the_same_fraction():
    torch.manual_seed(0)
    model, args, kwargs = _unet2d()
    # 8-bit ends: their step sizes are ~16x smaller than the 4-bit tables'
    overrides = [LayerOverride(pattern=name, act_bits=8) for name in ("conv_in", "conv_out")]
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, learn_zero_point=True, overrides=overrides),
              LoRAConfig(rank=2))
    with calibrating(model):
        _output(model, args, kwargs)
    tables = _act_tables(model)
    params = quant_parameters(model).act_scales
    groups = act_param_groups(model, lr=1e-3, scale_aware=True)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in params)
    rates = {g["name"][len("act_scale:"):]: g["lr"] for g in groups if g["name"] != "act_scales"}
    assert set(rates) == set(tables) and sum(rates.values()) / len(rates) == pytest.approx(1e-3)
    zero_points = [g for g in groups if g["name"] == "act_scales"]
    assert zero_points[0]["lr"] == 1e-3 and len(zero_points[0]["params"]) == len(tables)
    assert act_param_groups(model, lr=1e-3) == [{"params": params, "lr": 1e-3, "name": "act_scales"}]

    def relative_moves(scale_aware: bool) -> list[float]:
        """Mean |change| / |step| of every table after one AdamW step on a unit gradient."""
        before = {name: scale.detach().clone() for name, scale in tables.items()}
        optimizer = torch.optim.AdamW(act_param_groups(model, 1e-3, scale_aware), weight_decay=0.0)
        for scale in tables.values():
            scale.grad = torch.ones_like(scale)
        optimizer.step()
        moves = [float(((tables[n].detach() - b).abs() / b.abs()).mean()) for n, b in before.items()]
        with torch.no_grad():
            for name, scale in tables.items():
                scale.copy_(before[name])
        return moves

    absolute, aware = relative_moves(False), relative_moves(True)
    assert max(absolute) / min(absolute) > 8  # one rate: the 8-bit tables move >8x as far
    assert max(aware) / min(aware) < 1.2  # not 1: a table's entries differ in size


def test_merge_lora_keeps_model_output():
    torch.manual_seed(0)
    model, args, kwargs = _dit()
    quantize_(model, QuantConfig(weight_bits=4, act_bits=8), LoRAConfig(rank=2))
    with calibrating(model):
        _output(model, args, kwargs)
    with torch.no_grad():
        for param in quant_parameters(model).lora[1::2]:
            param.normal_(std=0.02)
    before = _output(model, args, kwargs)
    merge_lora(model)
    torch.testing.assert_close(_output(model, args, kwargs), before, rtol=0, atol=1e-5)


def test_aux_branches_on_a_transformer_lower_the_error_and_decay_away():
    torch.manual_seed(0)
    model, args, kwargs = _dit()
    reference = _output(model, args, kwargs)
    errors = {}
    for enabled in (False, True):
        student = copy.deepcopy(model)
        aux_cfg = AuxConfig(enabled=enabled, rank=4, phase_steps=1)
        quantize_(student, QuantConfig(weight_bits=3, act_bits=8), None, aux_cfg)
        with calibrating(student):
            _output(student, args, kwargs)
        errors[enabled] = (_output(student, args, kwargs) - reference).norm()
    assert errors[True] < errors[False]
    assert len(quant_parameters(student).aux) == 2 * len(dict(iter_quant_layers(student)))
    RankDecay(student, aux_cfg).finish()
    assert quant_parameters(student).aux == [] and not any(".aux." in k for k in student.state_dict())
    _output(student, args, kwargs)


def test_layers_calibration_never_reaches_are_reported_not_fatal():
    torch.manual_seed(0)
    model, args, kwargs = _dit()
    model.unused = nn.Linear(4, 4)
    quantize_(model, QuantConfig(weight_bits=8, act_bits=8))
    with pytest.warns(UserWarning, match="never reached"), calibrating(model):
        _output(model, args, kwargs)
    assert not model.unused.act_quantizer.calibrating
    assert model.transformer_blocks[0].attn1.to_q.act_quantizer.timesteps.numel() == 2
