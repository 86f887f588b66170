"""launch/supervise.py on its own: a job that keeps failing is restarted --max-restarts times and then given up on,
and a user error (exit 2) is never retried; the restarts of real runs are in tests/e2e/test_faults.py."""

import subprocess
import sys

from conftest import ROOT


def test_supervisor_gives_up_after_max_restarts_and_never_retries_user_errors(tmp_path):
    from dsllm.supervise import supervise

    failing = [sys.executable, "-c", "import sys; sys.exit(7)"]
    messages = []
    assert supervise(failing, max_restarts=2, delay=0, log=messages.append) == 7
    assert messages[-1] == "supervise: the job failed (exit code 7) and --max-restarts 2 are used up"
    assert len(messages) == 3
    messages.clear()
    assert (
        supervise([sys.executable, "-c", "import sys; sys.exit(2)"], max_restarts=5, delay=0, log=messages.append) == 2
    )
    assert messages == []
    proc = subprocess.run(
        [
            sys.executable,
            "launch/supervise.py",
            "--max-restarts",
            "1",
            "--",
            "python",
            "launch/pretrain.py",
            "--resume",
            "none",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "must resume automatically" in proc.stderr
