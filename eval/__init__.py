"""qdiff's benchmark suites (not shipped with the package; run from the repository root).

    python -m eval.quality            # quality against PTQ and full QAT (eval/quality/benchmark.py)
    python -m eval.video              # QVGen on the embedded video teacher (eval/video/video.py)
    python -m eval.speed              # speed and memory of the exported pipelines (eval/speed/speed.py)
    python -m eval.training_cost      # cost of a training step at SD's size (eval/training_cost/train_cost.py)
    python -m eval.speed.rotation_cost   # any other script of a suite, by its module name
    python -m eval.common.provenance  # regenerate eval/results/PROVENANCE.md from git history

Each suite writes to eval/results/<suite>/ through eval.common.report, whose JSON carries
the provenance of the run (qdiff version, commit, machine, torch, command line).
"""
