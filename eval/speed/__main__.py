"""python -m eval.speed: the suite's main script, eval/speed/speed.py."""

import sys

from eval.speed.speed import main

if __name__ == "__main__":
    sys.argv[0] = "python -m eval.speed"  # what --help shows as the usage
    main()
