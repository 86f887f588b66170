"""The restart loop: run a training command; after a failure, run it again (the trainer resumes from
its newest complete checkpoint, `--resume auto`), up to `--max-restarts` times. Launcher-agnostic:
it wraps `deepspeed …`, `mpirun …` or a plain `python launch/pretrain.py …` alike.

SIGINT, SIGTERM and SIGUSR1 sent to the supervisor go to the whole job (its own process group): the
trainer saves a checkpoint and exits, the supervisor waits until no process of the job is left and
does not restart. A run stopped by diverging (exit 3) is not restarted either: it would diverge again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from dsllm.errors import USER_ERROR_EXIT, ArgumentParser, UserError
from dsllm.run_control import STOP_SIGNALS, STOPPED_EXIT

DIVERGED_EXIT = 3  # the trainer's TrainingAborted: non-finite values; a restart would repeat it
NO_RETRY = {0, USER_ERROR_EXIT, DIVERGED_EXIT}  # success, a bad input or a diverged run: a restart cannot fix it


def describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f"exit code {code} ({signal.Signals(code - 128).name})"
    return f"exit code {code}"


class Job:
    """One attempt: the command in a process group of its own, so a signal reaches every process of it
    (launcher, ranks, loader workers) and the supervisor can tell when the last one is gone."""

    def __init__(self, command: list[str]):
        self.proc = subprocess.Popen(command, process_group=0, preexec_fn=_die_with_parent)

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        code = self.proc.wait()
        while _group_alive(self.proc.pid):  # the launcher may exit before its ranks have saved and quit
            time.sleep(0.2)
        return code


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (even by SIGKILL), so no job outlives it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def last_healthy(command: list[str]) -> str:
    """The checkpoint `--resume auto` would take in the command's --out (only healthy ones are ever written)."""
    from pathlib import Path

    from dsllm.checkpoint.store import CHECKPOINTS_DIR, lineage_candidates
    from dsllm.train_config import TrainConfig

    flags = [arg.split("=", 1) if arg.startswith("--out=") else [arg] for arg in command]
    flat = [part for parts in flags for part in parts]
    out = flat[flat.index("--out") + 1] if "--out" in flat[:-1] else TrainConfig.out
    done = lineage_candidates(Path(out) / CHECKPOINTS_DIR)
    return str(done[0]) if done else "none"


def supervise(command: list[str], max_restarts: int, delay: float = 5.0, log=print) -> int:
    attempt, received = 0, []

    def forward(signum, frame):
        received.append(signum)
        job.signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        while True:
            job = Job(command)
            code = job.wait()
            if received:
                log(
                    f"supervise: {signal.Signals(received[0]).name} passed to the job, which ended ({describe(code)}); "
                    "not restarting"
                    + (
                        ""
                        if code in (0, STOPPED_EXIT)
                        else " (the ranks' lines above say whether a checkpoint was written)"
                    )
                )
                return code if code >= 0 else 128 - code
            if code in NO_RETRY:
                if code == DIVERGED_EXIT:
                    log(
                        "supervise: the run diverged (exit code 3); not restarting, "
                        "since resuming would diverge again. "
                        f"Last healthy checkpoint: {last_healthy(command)}"
                    )
                return code
            if attempt >= max_restarts:
                log(f"supervise: the job failed ({describe(code)}) and --max-restarts {max_restarts} are used up")
                return code
            attempt += 1
            log(
                f"supervise: the job failed ({describe(code)}); restart {attempt}/{max_restarts} in {delay:g} s, "
                "resuming from the newest complete checkpoint"
            )
            time.sleep(delay)
            if received:  # asked to stop between attempts
                return 128 + received[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dsllm supervise", description=__doc__)
    parser.add_argument("--max-restarts", type=int, required=True, metavar="N", help="restarts after failures")
    parser.add_argument("--restart-delay", type=float, default=5.0, metavar="S", help="seconds before a restart")
    parser.add_argument("command", nargs="+", help="the training command, after --")
    return parser


def main(argv=None) -> int:
    """`dsllm supervise --max-restarts N -- deepspeed launch/pretrain.py --ds_config …`."""
    args = build_parser().parse_args(argv)
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts {args.max_restarts}: give 0 or more")
    if "--resume" in args.command and args.command[args.command.index("--resume") + 1 :][:1] != ["auto"]:
        raise UserError("the supervised command must resume automatically: drop --resume or pass --resume auto")
    return supervise(
        args.command, args.max_restarts, args.restart_delay, log=lambda m: print(m, file=sys.stderr, flush=True)
    )
