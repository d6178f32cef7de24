"""The one base class of the failures a user can fix.

Every error that qdiff raises for a user's mistake or a damaged file derives from
`QdiffError`, and its message names the problem and the fix. The command-line entry points
(`qdiff.cli.run_main`) print such an error as one line and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QdiffError(Exception):
    """A failure the user can fix; the message says what is wrong and what to do."""
