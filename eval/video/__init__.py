"""QVGen on the embedded video teacher: W4A4 students, their seeds and where their error comes from.

    video (python -m eval.video): W4A4 with and without Phi, calibrated PTQ, W3A3
    seeds, error_budget: python -m eval.video.<script>; gaps: what the reports are compared by

Reports go to eval/results/video/."""
