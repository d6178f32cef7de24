"""What eval/video/video.py's reports are compared by, in one place for the scripts that read
them (video.py writes them, seeds.py gathers them over seeds): the share of calibrated
PTQ's distance to FP a row closes, and whether two reports scored the same FP videos.
Free of torch, so a script that only reads reports starts at once."""

from __future__ import annotations

import math

# Relative, on the FP row's FID to real. The teacher's videos sampled on another CPU differ
# in the last bits (5.553609 on one machine, 5.553610 on another), where another teacher,
# seed or setting moves it in the first digits.
FP_MATCH_TOLERANCE = 1e-5


def gap_closed(value: float, ptq: float, fp: float) -> float:
    """Share of calibrated PTQ's distance to FP (`ptq - fp`) that `value` closes."""
    return (ptq - value) / (ptq - fp)


def same_fp_videos(fp: dict, other_fp: dict) -> bool:
    """Whether two reports' FP rows scored the same teacher videos, to float rounding."""
    return math.isclose(fp["frame_fid_real"], other_fp["frame_fid_real"], rel_tol=FP_MATCH_TOLERANCE)
