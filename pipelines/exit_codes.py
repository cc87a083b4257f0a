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


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Every error that means the input was bad (exit status 2): imported when asked, since they live in the
    modules that raise them and some of those are slow to import."""
    from evaluators.gate import PolicyError
    from evaluators.registry import RegistryInUse
    from evaluators.study_report import StudyReportError
    from trainer import storage
    from trainer.checkpoint import CheckpointRefused, RunInUse
    from trainer.config import ConfigError
    from trainer.data.loader import DataError

    return (ConfigError, DataError, UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            storage.NotWritable, PolicyError, CheckpointRefused, RunInUse, RegistryInUse, StudyReportError)
