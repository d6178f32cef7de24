"""python -m eval.memory: the suite's main script, eval/memory/real_size.py."""

import sys

from eval.memory.real_size import main

if __name__ == "__main__":
    sys.argv[0] = "python -m eval.memory"  # what --help shows as the usage
    main()
