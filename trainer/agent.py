"""``python -m trainer.agent [torchrun arguments]``: torchrun's elastic agent, where SIGTERM is a stop.

The kubelet stops a pod by sending SIGTERM to its first process, the agent. torchrun forwards the signal to
the workers, which finish their step, commit a checkpoint and exit 0 (``trainer.train``), but then re-raises
it, so the job would report failure although nothing failed. Here the agent exits 0 when this node's workers
said, through a file the agent names in ``$MAECLIP_STOPPED_FILE``, that they stopped after the checkpoint was
committed; it exits 128 + the signal number (the shell's convention) when they did not.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import SignalException

STOPPED_FILE = "MAECLIP_STOPPED_FILE"


def main(argv: list[str] | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="maeclip-agent-") as folder:
        stopped = os.path.join(folder, "stopped")
        os.environ[STOPPED_FILE] = stopped  # the workers inherit the agent's environment
        try:
            torchrun.main(argv)
        except SignalException as err:
            if err.sigval == signal.SIGTERM and os.path.exists(stopped):
                with open(stopped) as handle:
                    print(f"[agent] stopped on SIGTERM; {handle.read().strip()}", flush=True)
                sys.exit(0)
            print(f"[agent] killed by {signal.Signals(err.sigval).name} before the workers committed",
                  file=sys.stderr, flush=True)
            sys.exit(128 + int(err.sigval))


if __name__ == "__main__":
    main(sys.argv[1:])
