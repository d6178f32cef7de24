"""python -m eval.video: the suite's main script, eval/video/video.py."""

import sys

from eval.video.video import main

if __name__ == "__main__":
    sys.argv[0] = "python -m eval.video"  # what --help shows as the usage
    main()
