"""python -m eval.training_cost: the suite's main script, eval/training_cost/train_cost.py."""

from eval.training_cost.train_cost import main

if __name__ == "__main__":
    main()
