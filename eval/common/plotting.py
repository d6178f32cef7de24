"""The eval scripts draw their plots with matplotlib (the `bench` extra). They check for it
before the measurements start, not after an hour of them."""

from __future__ import annotations


def require_matplotlib(script: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"{script} plots its results with matplotlib: "
                         "pip install -e \".[bench]\"") from None
    matplotlib.use("Agg")
