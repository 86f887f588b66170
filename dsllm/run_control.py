"""What keeps a run in one piece around the loop: a graceful stop on SIGINT/SIGTERM/SIGUSR1 (preemption),
a watchdog for ranks that stop making progress, and the lock that keeps a second trainer off a run folder.

Signals only set a flag. Every step the ranks agree (a tiny all-reduce on a CPU group) on whether any of
them was asked to stop, so they all stop after the same step, save one checkpoint and exit with
STOPPED_EXIT, which the Slurm script requeues and `supervise.py` understands.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from dsllm.errors import UserError

STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run again (--resume auto) to continue
HUNG_EXIT = 4  # a rank or collective stopped making progress (shared with the peer-failure exit)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
LOCK_FILE = ".dsllm.lock"
PROCESS_START = time.monotonic()  # --max-time counts from here: start-up, loading and compiling are time too


class TrainingAborted(Exception):
    """Training stopped for a reason found while running (not a bad input): exit 3."""


class RunStopped(Exception):
    """Training stopped on request after saving a checkpoint: a signal (exit 75) or the time budget (exit 0)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class StopRequest:
    """The first stop signal marks the run for a checkpoint at the next step boundary; later ones are
    ignored (DeepSpeed's launcher answers Ctrl-C by sending SIGTERM to every rank as well). If the stop
    takes longer than `grace` seconds, the rank exits without a checkpoint."""

    def __init__(self, grace: float, rank: int):
        self.grace, self.rank = grace, rank
        self.signal_name: str | None = None
        self.signum = 0
        self._previous = {}

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if _parent_is_deepspeed_launcher():
            threading.Thread(target=self._watch_launcher, name="dsllm-launcher-watch", daemon=True).start()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            return
        self.signal_name, self.signum = signal.Signals(signum).name, signum
        if self.rank == 0:
            _say(
                f"{self.signal_name}: stopping after this step with a checkpoint (within --stop-grace {self.grace:g} s)"
            )
        timer = threading.Timer(self.grace, self._expire)
        timer.daemon = True
        timer.start()

    def _expire(self) -> None:
        _say(
            f"rank {self.rank}: no checkpoint within --stop-grace {self.grace:g} s of {self.signal_name}; exiting "
            "without one (resume with --resume auto continues from the last complete checkpoint)"
        )
        os._exit(STOPPED_EXIT)

    def _watch_launcher(self) -> None:
        """DeepSpeed's `deepspeed` command does not pass SIGTERM on to its launch.py on one node, and launch.py
        does not pass SIGUSR1 on at all: when either of them dies, the ranks would train on as orphans.
        A rank whose launcher goes away stops as if it had been sent SIGTERM."""
        launcher = os.getppid()
        runner = _parent_of(launcher)
        while True:
            time.sleep(0.5)
            if os.getppid() != launcher or _parent_of(launcher) != runner:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def agree(self, group=None, also: bool = False) -> bool:
        """Whether any rank was asked to stop by a signal, or has a reason of its own (`also`: the time budget).
        Every rank calls this after every step."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum, int(also)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        signum, other = flag.tolist()
        if signum and self.signal_name is None:
            self.signal_name = f"{signal.Signals(signum).name} (sent to another rank)"
        return bool(signum or other)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _parent_is_deepspeed_launcher() -> bool:
    return any("deepspeed.launcher.launch" in part for part in _cmdline(os.getppid()))


def control_group():
    """A CPU (gloo) process group for the per-step stop agreement: on NCCL an all-reduce would need a
    device sync every step; on CPU the default group already is gloo."""
    import torch.distributed as dist

    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


class Watchdog:
    """Ends the job when this rank makes no progress (a step, an evaluation, a save) for `timeout` seconds:
    a hung or stopped peer blocks every collective, and DeepSpeed's CPU shared-memory all-reduce has no
    timeout of its own. Before exiting it kills the other ranks of this host (their job is over too), so
    the launcher does not wait on a stopped process."""

    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = timeout, rank
        self.last = time.monotonic()
        self.armed = False
        threading.Thread(target=self._run, name="dsllm-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def arm(self) -> None:
        self.last, self.armed = time.monotonic(), True

    def disarm(self) -> None:
        self.armed = False

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 10))
            idle = time.monotonic() - self.last
            if self.armed and idle > self.timeout:
                _say(
                    f"error: rank {self.rank}: no progress for {idle:.0f} s (--collective-timeout "
                    f"{self.timeout:g}): another rank hung or a collective stalled; ending the job. Resume with "
                    "--resume auto (or run under launch/supervise.py)"
                )
                kill_local_peers()
                os._exit(HUNG_EXIT)


_LOCAL_PEERS: list[int] = []


def local_peer_pids(rank: int) -> list[int]:
    """The process ids of the other ranks on this host (a collective: every rank calls it)."""
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), os.getpid()))
    _LOCAL_PEERS[:] = [pid for i, (host, pid) in enumerate(everyone) if host == socket.gethostname() and i != rank]
    return list(_LOCAL_PEERS)


def kill_local_peers() -> None:
    """End the other ranks of this host: the job is over, and a stopped or hung one would keep the launcher
    waiting (DeepSpeed's launch.py gives a rank 30 s after SIGTERM before SIGKILL)."""
    for pid in _LOCAL_PEERS:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class RunLock:
    """An exclusive lock on a run folder for one trainer (rank 0). The kernel releases it when the process
    dies, so a lock left by a crashed run never blocks the next one; the file says who holds it."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # POSIX lock: not inherited by loader workers
        except (BlockingIOError, PermissionError):
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                who = json.loads(holder)
                who = f"pid {who['pid']} on {who['host']}, since {who['since']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise UserError(
                f"--out {self.path.parent}: another trainer is using this run folder ({who}); wait for it "
                "to finish or stop it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": datetime.datetime.now().isoformat(timespec="seconds"),
                }
            ).encode(),
        )
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (removing it would race a new holder)
            self.fd = None


# -- how a training command ends: one line per fault, the exit code that says what to do -----------------------
def run_training(preflight, train, world) -> int:
    """`train(preflight())` with every way a run ends mapped to its exit code: 0 done (or stopped at the time
    budget), 2 a bad input, 3 diverged, 4 a peer rank failed or hung, 75 stopped on a signal with a checkpoint,
    130 interrupted before training. Pre-flight faults are the same on every rank: rank 0 says them; later ones
    are said by the first rank of each host that saw them."""
    started = False
    try:
        plan = preflight()
        started = True
        train(plan)
    except RunStopped as err:
        if world.is_main:
            _say(str(err))
        end_process_group()
        return err.exit_code
    except (UserError, TrainingAborted) as err:
        if (not started and world.is_main) or (started and _first_to_report(str(err), world)):
            prefix = f"rank {world.rank}: " if started and world.size > 1 and not world.is_main else ""
            _say(f"error: {prefix}{err}")
        return _exit_now(2 if isinstance(err, UserError) else 3)
    except KeyboardInterrupt:
        if world.is_main:
            _say(
                "interrupted outside the training loop; checkpoints already written are kept "
                "(--resume auto continues from the newest)"
            )
        return 130
    except RuntimeError as err:
        if not _peer_failure(err):
            raise
        first = str(err).strip().splitlines()[0][:300]
        if not _reported_on_this_host(world):  # a rank that exited on a fault of its own has said why: no second line
            _say(
                f"error: rank {world.rank}: a collective failed because another rank died, hung past "
                f"--collective-timeout or lost the network ({first}); the launcher's log names the rank "
                "that exited first. Resume with --resume auto (or run under launch/supervise.py)"
            )
        time.sleep(2)  # DeepSpeed's launcher polls every second: let it see, and name, the rank that failed first
        kill_local_peers()
        return _exit_now(HUNG_EXIT)
    return 0


def _exit_now(code: int) -> int:
    """With a process group up, a rank that leaves on a fault must not wait for its peers (they may be stuck in a
    collective) nor run gloo's destructors, which abort ('terminate called without an active exception', exit
    250 instead of this code): flush and exit at once. Without one, return the code."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_process_group() -> None:
    """Barrier, then the process group down, then a pause for gloo's worker threads. A worker that finished the
    last collectives still drops the Python tensors they held, which needs the GIL; if the main thread reaches
    interpreter exit first, that thread is killed inside C++ and the rank aborts after its work is done (CI saw
    it: SIGABRT, exit 134, the trace in ProcessGroupGloo::runLoop -> decref_pyobject). The sleep releases the
    GIL so they can finish."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(0.2)


def _error_folder() -> Path:
    """Where the ranks of one job on this host mark the faults they reported (they share a launcher)."""
    import tempfile

    job = f"{os.getuid()}-{os.getppid()}-{os.environ.get('MASTER_PORT', '')}"
    return Path(tempfile.gettempdir()) / f"dsllm-errors-{job}"


def _first_to_report(message: str, world) -> bool:
    """Whether this rank is the first of its host to report this message (ranks that all hit the same fault
    print it once). A marker file per message in `_error_folder()`."""
    import hashlib

    if world.size == 1:
        return True
    folder = _error_folder()
    folder.mkdir(exist_ok=True)
    try:
        name = hashlib.sha256(message.encode()).hexdigest()[:16]
        os.close(os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _reported_on_this_host(world) -> bool:
    return world.size > 1 and _error_folder().is_dir() and any(_error_folder().iterdir())


def _peer_failure(err: RuntimeError) -> bool:
    import torch.distributed as dist

    markers = (
        "connection closed by peer",
        "connection reset by peer",
        "broken pipe",
        "timed out",
        "timeout",
        "nccl communicator was aborted",
    )  # gloo says "Timed out waiting 15000ms for recv operation"
    return isinstance(err, getattr(dist, "DistError", ())) or any(m in str(err).lower() for m in markers)
