"""What distillation costs: time and memory of a training step, its phases, the LoRA backward, the packed base weight.

    train_cost (python -m eval.training_cost): full QAT against qdiff per training step at SD's size
    step_phases, gather_cost, memory, packed_base: python -m eval.training_cost.<script>

Reports go to eval/results/training_cost/."""
