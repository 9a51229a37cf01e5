"""Runs a command and reports how it and every process it started ended, ranks included.

    python -m tests.train.exit_codes OUT.json SECONDS recsys fit --config job.yaml --trainer.devices 2

A 2-rank ``recsys fit`` is two processes: Lightning's launcher starts rank 1 as a child of rank 0,
and nobody reads rank 1's exit status once rank 0 has ended. This driver becomes a child subreaper
(Linux ``prctl``), so processes orphaned by the command are re-parented to it, and it waits for all
of them. OUT.json: ``{"command": exit code of the command, "all": [exit code of every process]}``
(negative: killed by that signal). The command runs in its own session, as a job would; after SECONDS
its whole process group is killed (what is left of a hung run, so no rank outlives the test).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading

PR_SET_CHILD_SUBREAPER = 36


def _kill_group(leader: int) -> None:
    """SIGKILLs the process group ``leader`` started (a new session's group has the leader's pid)."""
    try:
        os.killpg(leader, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group has ended
        pass


def main() -> None:
    out, seconds, command = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    started = subprocess.Popen(command, start_new_session=True)
    deadline = threading.Timer(seconds, _kill_group, (started.pid,))
    deadline.daemon = True
    deadline.start()
    codes: dict[int, int] = {}
    while True:  # the command, then whatever it left behind, until no child remains
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        codes[pid] = os.waitstatus_to_exitcode(status)
    deadline.cancel()
    started.returncode = codes[started.pid]  # reaped here, not by Popen
    with open(out, "w") as f:
        json.dump({"command": codes[started.pid], "all": list(codes.values())}, f)


if __name__ == "__main__":
    main()
