"""Quality of the low-bit students of the embedded digits teacher: PTQ baselines, distillation, the metrics' noise floor and run-to-run spread.

    benchmark (python -m eval.quality): qdiff against PTQ and full QAT, every row in one run
    teacher, ptq, finetune, seed_spread, noise, step_sensitivity: python -m eval.quality.<script>

Reports go to eval/results/quality/."""
