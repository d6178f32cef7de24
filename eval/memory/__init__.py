"""Memory of a distillation at real size: counted on the meta device, nothing allocated.

    real_size (python -m eval.memory): teacher, packed student, LoRA + AdamW per 2026 family
    count: the counting functions (a meta nn.Module and qdiff's quant / LoRA configs)

Reports go to eval/results/memory/."""
