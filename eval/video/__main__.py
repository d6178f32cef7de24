"""python -m eval.video: the suite's main script, eval/video/video.py."""

from eval.video.video import main

if __name__ == "__main__":
    main()
