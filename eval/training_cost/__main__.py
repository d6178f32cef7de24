"""python -m eval.training_cost: the suite's main script, eval/training_cost/train_cost.py."""

import sys

from eval.training_cost.train_cost import main

if __name__ == "__main__":
    sys.argv[0] = "python -m eval.training_cost"  # what --help shows as the usage
    main()
