"""eval/memory/count.py: the bytes it counts on a meta model are the bytes a real quantized
student holds (parameters, buffers, gradients, AdamW state after one step), to the byte;
and each real-size architecture builds on the meta device with its published size."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel, WanTransformer3DModel

from eval.memory.count import build_meta, parameter_count, student_bytes, teacher_bytes
from eval.memory.real_size import ARCHITECTURES, FAMILIES
from qdiff.config import AuxConfig, LayerOverride, LoRAConfig, QuantConfig
from qdiff.distill.optim import freeze_all_but_quant_params
from qdiff.families import FAMILIES as FAMILY_REGISTRY
from qdiff.quant import quantize_, set_timesteps

TIMESTEPS = [999.0, 750.0, 500.0, 250.0, 1.0]


def _unet():
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, norm_num_groups=4)
    inputs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 3, 16))
    return model, inputs


def _flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                   guidance_embeds=True)
    inputs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 5, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))
    return model, inputs


def _wan():
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                  in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32,
                                  num_layers=1, rope_max_seq_len=32)
    inputs = dict(hidden_states=torch.randn(1, 4, 1, 4, 4), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 5, 12))
    return model, inputs


CASES = {
    # SD-style UNet: temporal tables, split concat inputs, the SD family's 8-bit layers
    "unet-temporal": (_unet, QuantConfig(act_mode="temporal", split_concat_inputs=True,
                                         family_overrides=True, packed_base_weight=True),
                      LoRAConfig(rank=4), None, "sd", True),
    # FLUX: per-token activations, 3-bit weights (nibbles) with an 8-bit override, LSQ+,
    # frozen weight step sizes
    "flux-dynamic": (_flux, QuantConfig(weight_bits=3, act_mode="dynamic_per_token",
                                        learn_zero_point=True, packed_base_weight=True,
                                        overrides=[LayerOverride("proj_out", 8, 8)]),
                     LoRAConfig(rank=8), None, None, False),
    # Wan: per-token activations, the Wan 8-bit layers, QVGen's Phi, 2-bit codes somewhere
    "wan-aux": (_wan, QuantConfig(act_mode="dynamic_per_token", family_overrides=True,
                                  packed_base_weight=True, exclude=["blocks.0.ffn.*"],
                                  overrides=[LayerOverride("blocks.0.attn2.*", 2, None)]),
                LoRAConfig(rank=4), AuxConfig(enabled=True, rank=4), "wan", True),
}


def _tensor_bytes(tensors) -> int:
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_counted_bytes_are_the_real_students_bytes(case):
    build, quant_cfg, lora_cfg, aux_cfg, family, train_weight_scales = CASES[case]
    torch.manual_seed(0)
    teacher, inputs = build()
    if family is not None:  # the family's 8-bit layers, as build_student adds them
        quant_cfg = FAMILY_REGISTRY[family].quant_config(quant_cfg)
    meta = build_meta({**teacher.config, "_class_name": type(teacher).__name__})
    assert parameter_count(meta) == parameter_count(teacher)

    counted = student_bytes(meta, quant_cfg, lora_cfg, aux_cfg, table_entries=len(TIMESTEPS),
                            train_weight_scales=train_weight_scales)
    assert counted.quantized_layers > 0 and counted.codes > 0

    # what build_student does: a float32 copy of the teacher, quantized in place
    student = copy.deepcopy(teacher).float()
    quantize_(student, quant_cfg, lora_cfg, aux_cfg)
    set_timesteps(student, TIMESTEPS)
    freeze_all_but_quant_params(student, False, train_weight_scales)
    trained = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    output = student(**inputs, return_dict=False)[0]
    output.float().pow(2).mean().backward()
    optimizer.step()

    model_bytes = _tensor_bytes([*student.parameters(), *student.buffers()])
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert len(grads) == len(trained)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert counted.model == model_bytes
    assert counted.optimizer == _tensor_bytes(grads) + _tensor_bytes(state)
    lora = [t for name, t in student.named_parameters() if ".lora_" in name]
    assert counted.lora == _tensor_bytes(lora)
    codes = [t for name, t in student.named_buffers() if name.endswith("base_codes")]
    assert counted.codes == _tensor_bytes(codes)

    assert teacher_bytes(meta) == _tensor_bytes([*teacher.to(torch.bfloat16).parameters(),
                                                 *teacher.buffers()])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_each_architecture_has_its_published_size(name):
    family = next(f for f in FAMILIES if f.architecture == name)
    model = build_meta(json.loads(ARCHITECTURES[name].read_text()))
    params = parameter_count(model)
    assert abs(params - family.published_params) <= family.tolerance * family.published_params, \
        (name, params, family.published_params)
    assert params == family.counted_params, (name, params)
