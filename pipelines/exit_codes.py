"""What each exit status of ``maeclip`` means (docs/contracts.md §7), and the errors of our own that map to them.

0 success; 1 the job could not finish (infrastructure, a failed or diverged training job); 2 bad input, one
line, nothing launched; 3 the gate rejected the checkpoint.
"""

from __future__ import annotations

INFRASTRUCTURE_FAILURE, USAGE_ERROR, GATE_REJECTED = 1, 2, 3


class UsageError(Exception):
    """A problem with what the user asked for; reported on one line with exit status 2."""


class GateRejected(Exception):
    """The gate's decision was "no"; the decision line is already printed (exit status 3)."""
