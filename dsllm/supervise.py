"""The restart loop: run a training command; after a failure, run it again (the trainer resumes from
its newest complete checkpoint, `--resume auto`), up to `--max-restarts` times. Launcher-agnostic:
it wraps `deepspeed …`, `mpirun …` or a plain `python launch/pretrain.py …` alike."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from dsllm.errors import USER_ERROR_EXIT, ArgumentParser, UserError

NO_RETRY = {0, USER_ERROR_EXIT}  # success, or a bad input that a restart cannot fix


def describe(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f"exit code {code} ({signal.Signals(code - 128).name})"
    return f"exit code {code}"


def supervise(command: list[str], max_restarts: int, delay: float = 5.0, log=print) -> int:
    attempt = 0
    while True:
        code = subprocess.call(command)
        if code in NO_RETRY:
            return code
        if attempt >= max_restarts:
            log(f"supervise: the job failed ({describe(code)}) and --max-restarts {max_restarts} are used up")
            return code
        attempt += 1
        log(f"supervise: the job failed ({describe(code)}); restart {attempt}/{max_restarts} in {delay:g} s, "
            "resuming from the newest complete checkpoint")
        time.sleep(delay)


def main(argv=None) -> int:
    """`python launch/supervise.py --max-restarts N -- deepspeed launch/pretrain.py --ds_config …`."""
    parser = ArgumentParser(prog="supervise.py", description=__doc__)
    parser.add_argument("--max-restarts", type=int, required=True, metavar="N", help="restarts after failures")
    parser.add_argument("--restart-delay", type=float, default=5.0, metavar="S", help="seconds before a restart")
    parser.add_argument("command", nargs="+", help="the training command, after --")
    args = parser.parse_args(argv)
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts {args.max_restarts}: give 0 or more")
    if "--resume" in args.command and args.command[args.command.index("--resume") + 1:][:1] != ["auto"]:
        raise UserError("the supervised command must resume automatically: drop --resume or pass --resume auto")
    return supervise(args.command, args.max_restarts, args.restart_delay, log=lambda m: print(m, file=sys.stderr, flush=True))
