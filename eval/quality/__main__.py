"""python -m eval.quality: the suite's main script, eval/quality/benchmark.py."""

from eval.quality.benchmark import main

if __name__ == "__main__":
    main()
