"""Inference of the exported low-bit pipelines: speed, memory, size and exactness, and what single layer options cost.

    speed (python -m eval.speed): the exported W4A8 / W4A4 pipelines against their float teacher on the CPU
    cuda, export, rotation_cost, act_groups_cost: python -m eval.speed.<script>

Reports go to eval/results/speed/."""
