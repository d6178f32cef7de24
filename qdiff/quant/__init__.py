"""Quantization primitives, quantizers, quantized layers and `quantize_`.

    report = quantize_(student, cfg.quant, cfg.lora, cfg.aux)
    with calibrating(student):          # activation scales from teacher trajectories
        run_trajectories(student)
    decay = RankDecay(student, cfg.aux, total_steps, optimizer)   # if cfg.aux.enabled
"""

# the built-in activation quantizers register their modes on import, the default first
from .temporal_act_quantizer import TemporalActQuantizer  # isort: skip
from .dynamic_act_quantizer import DynamicActQuantizer  # isort: skip
# and the built-in weight quantizer registers its mode (the default)
from .lsq_weight_quantizer import LSQWeightQuantizer  # isort: skip
from .act_quantizer import (ActQuantizer, ActTable, UnknownActModeError, act_modes,
                            act_quantizer_class, register_act_quantizer, unregister_act_quantizer)
from .aux_branch import AuxBranch
from .layers import QUANT_LAYERS, QuantConv2d, QuantConv3d, QuantLayer, QuantLinear
from .model_ops import (QuantParams, act_param_groups, calibrating, finish_calibration,
                        iter_quant_layers, lora_param_groups, mean_weight_steps, merge_lora,
                        nonpositive_step_tables, quant_parameters, set_timesteps,
                        start_calibration)
from .packing import pack_codes, unpack_codes
from .primitives import (fake_quantize, grad_scale, grid_codes, init_scale, int_range,
                         lp_search_init, minmax_init, round_ste)
from .quantize import quantize_, timestep_context
from .rank_decay import RankDecay
from .report import QuantizationReport, ReportRow
from .split_act_quantizer import SplitActQuantizer
from .timestep_context import TimestepContext
from .weight_quantizer import (UnknownWeightModeError, WeightQuantizer, register_weight_quantizer,
                               unregister_weight_quantizer, weight_modes, weight_quantizer_class)

__all__ = [
    "ActQuantizer", "ActTable", "UnknownActModeError", "act_modes", "act_quantizer_class",
    "register_act_quantizer", "unregister_act_quantizer",
    "UnknownWeightModeError", "WeightQuantizer", "register_weight_quantizer",
    "unregister_weight_quantizer", "weight_modes", "weight_quantizer_class",
    "AuxBranch", "DynamicActQuantizer", "LSQWeightQuantizer", "QUANT_LAYERS", "QuantConv2d",
    "QuantConv3d", "QuantLayer", "QuantLinear", "QuantParams", "QuantizationReport", "RankDecay",
    "ReportRow", "SplitActQuantizer", "TemporalActQuantizer", "TimestepContext", "act_param_groups", "calibrating", "fake_quantize",
    "finish_calibration", "grad_scale", "grid_codes", "init_scale", "int_range", "iter_quant_layers",
    "lora_param_groups", "lp_search_init", "mean_weight_steps", "merge_lora", "minmax_init", "nonpositive_step_tables",
    "pack_codes", "quant_parameters", "quantize_", "round_ste", "set_timesteps",
    "start_calibration", "timestep_context", "unpack_codes",
]
