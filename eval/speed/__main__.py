"""python -m eval.speed: the suite's main script, eval/speed/speed.py."""

from eval.speed.speed import main

if __name__ == "__main__":
    main()
