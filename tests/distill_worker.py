"""Run a short distillation and save the student's trainable state (for the multi-process test).

    torchrun --nproc_per_node 2 tests/distill_worker.py PIPELINE OUT.safetensors key=value...
"""

from __future__ import annotations

import os
import sys

import torch

from accelerate import Accelerator
from safetensors.torch import save_file

import qdiff
from qdiff.config import load_config
from qdiff.distill.checkpoint import _trainable_state
from qdiff.distill.loop import distill

if __name__ == "__main__":
    pipeline, out, *overrides = sys.argv[1:]
    cfg = load_config(None, [f"model.path={pipeline}", *overrides])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPU-only hosts
    expected = int(os.environ.get("WORLD_SIZE", 1))
    assert accelerator.num_processes == expected, f"{accelerator.num_processes} != {expected}"
    pipe = qdiff.load_pipeline(pipeline)
    pipe.set_progress_bar_config(disable=True)
    student = distill(pipe, cfg, cfg.run_dir, accelerator=accelerator)
    if accelerator.is_main_process:
        save_file(_trainable_state(student), out)
