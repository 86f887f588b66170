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

    def agree(self, group=None) -> bool:
        """Whether any rank was asked to stop (every rank calls this after every step)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() and self.signal_name is None:
            self.signal_name = f"{signal.Signals(flag.item()).name} (sent to another rank)"
        return bool(flag.item())


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
