"""python -m eval.quality: the suite's main script, eval/quality/benchmark.py."""

import sys

from eval.quality.benchmark import main

if __name__ == "__main__":
    sys.argv[0] = "python -m eval.quality"  # what --help shows as the usage
    main()
