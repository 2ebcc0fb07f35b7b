"""One base class for problems the user can fix.

Every error whose message tells the user what to change (a bad option, unreadable data, an
unwritable output, a run that diverged) derives from :class:`SplitqError`; the command-line tools
print such an error and exit with status 2. Anything else is a bug and keeps its traceback.
``SplitqError`` subclasses ``ValueError`` so that callers written against the older per-module
error classes keep working.
"""

from __future__ import annotations


class SplitqError(ValueError):
    """A user-fixable problem; the message names it and the fix."""


class NonFiniteError(SplitqError):
    """A NaN or infinity where a checkpoint needs finite values (a diverged calibration, bad data)."""
