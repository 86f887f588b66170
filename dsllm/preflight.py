"""Multi-host pre-flight: before any rank trains, check that every host in the hostfile answers over
ssh, runs the same code, Python stack and dataset, how much GPU memory each has free, which NCCL
variables are set, and that the batch arithmetic holds for the whole world size.

`python launch/preflight.py --hostfile H --data DIR --ds_config ds_configs/zero2.json [batch options]`
runs `python -m dsllm.preflight --probe` on every host over ssh and compares the answers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from dsllm.errors import ArgumentParser, UserError

ROOT = Path(__file__).resolve().parents[1]
CODE_GLOBS = ("dsllm/**/*.py", "launch/*", "ds_configs/*.json")


def code_hash(root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for pattern in CODE_GLOBS:
        for path in sorted(root.glob(pattern)):
            if path.is_file():
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def probe(data: str | None) -> dict:
    """What this host has: code, versions, dataset fingerprint, free GPU memory, NCCL variables."""
    import deepspeed
    import torch

    from dsllm import __version__

    fingerprint = None
    if data:
        from dsllm.data.mixture import train_fingerprint

        try:
            fingerprint = train_fingerprint(data)  # a folder's, or a mixture's sources' combined
        except UserError as err:
            fingerprint = f"unreadable: {err}"
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(
                {
                    "name": torch.cuda.get_device_name(i),
                    "free_gib": round(free / 2**30, 1),
                    "total_gib": round(total / 2**30, 1),
                }
            )
    return {
        "code": code_hash(),
        "dsllm": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "executable": sys.executable,
        "root": str(ROOT),
        "dataset": fingerprint,
        "gpus": gpus,
        "nccl": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_", "GLOO_"))},
    }


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise UserError(f"--hostfile {path}: no such file; write one line per host: 'HOSTNAME slots=GPUS'")
    hosts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if not slots or not slots[0][6:].isdigit():
            raise UserError(f"{path}:{lineno}: expected 'HOSTNAME slots=N', got {line!r}")
        hosts.append((parts[0], int(slots[0][6:])))
    if not hosts:
        raise UserError(f"{path}: lists no hosts")
    return hosts


def remote_probe(host: str, data: str | None, ssh: list[str]) -> dict:
    remote = f"cd {shlex.quote(str(ROOT))} && {shlex.quote(sys.executable)} -m dsllm.preflight --probe" + (
        f" --data {shlex.quote(data)}" if data else ""
    )
    proc = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *ssh, host, remote],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        raise ConnectionError(reason)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_hosts(hosts: list[tuple[str, int]], data: str | None, ssh: list[str], log=print) -> list[str]:
    """Probe every host; returns the problems found (empty: all hosts agree with this one)."""
    local, problems = probe(data), []
    for host, slots in hosts:
        try:
            answer = remote_probe(host, data, ssh)
        except (ConnectionError, subprocess.TimeoutExpired, ValueError) as err:
            problems.append(f"{host}: not reachable over ssh ({err}); set up passwordless ssh from this host")
            log(f"  {host:<20} UNREACHABLE")
            continue
        for key in ("code", "python", "torch", "deepspeed", "dataset", "root"):
            if answer[key] != local[key]:
                problems.append(
                    f"{host}: {key} differs ({answer[key]} here {local[key]}); put the same "
                    f"{'checkout' if key in ('code', 'root') else 'virtualenv' if key != 'dataset' else 'dataset'} "
                    "on every host"
                )
        if answer["gpus"] and len(answer["gpus"]) < slots:
            problems.append(f"{host}: hostfile says slots={slots} but it has {len(answer['gpus'])} GPUs")
        gpus = ", ".join(f"{g['free_gib']}/{g['total_gib']} GiB free" for g in answer["gpus"]) or "no GPU"
        log(f"  {host:<20} ok  code {answer['code']}  torch {answer['torch']}  deepspeed {answer['deepspeed']}  {gpus}")
    return problems


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dsllm preflight", description=__doc__)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # what each host runs
    parser.add_argument("--hostfile", help="DeepSpeed hostfile: 'HOSTNAME slots=GPUS' per line")
    parser.add_argument("--data", help="the dataset folder every host must see")
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", help="DeepSpeed JSON to check the batch for")
    parser.add_argument("--ssh-port", type=int, help="ssh port of the hosts")
    parser.add_argument("--ssh-option", action="append", default=[], help="extra ssh option, e.g. -i KEY (repeatable)")
    parser.add_argument("--micro-batch-size", type=int, help="per-rank micro batch the run will pass, if any")
    parser.add_argument("--grad-accum", type=int, help="gradient accumulation steps the run will pass, if any")
    parser.add_argument("--global-batch-size", type=int, help="global batch the run will pass, if any")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.data)))
        return 0
    if not args.hostfile or not args.ds_config:
        raise UserError("pass --hostfile and --ds_config (and --data) to check a multi-host launch")
    hosts = read_hostfile(Path(args.hostfile))
    world = sum(slots for _, slots in hosts)
    ssh = (["-p", str(args.ssh_port)] if args.ssh_port else []) + [
        o for opt in args.ssh_option for o in shlex.split(opt)
    ]
    print(f"pre-flight: {len(hosts)} host(s), world size {world}")
    print("NCCL/GLOO variables here: " + (", ".join(f"{k}={v}" for k, v in probe(None)["nccl"].items()) or "none set"))
    problems = check_hosts(hosts, args.data, ssh)
    from dsllm.ds_config import load_ds_config, resolve_batch

    try:
        raw = load_ds_config(args.ds_config)
        batch = resolve_batch(
            raw, args.micro_batch_size, args.grad_accum, args.global_batch_size, world, args.ds_config
        )
        print(
            f"batch: {batch.micro} per rank x {batch.accumulation} accumulation x {world} ranks = {batch.global_size}"
        )
    except UserError as err:
        problems.append(str(err))
    if problems:
        raise UserError(f"pre-flight found {len(problems)} problem(s): " + " | ".join(problems))
    print("pre-flight: all hosts ready")
    return 0


if __name__ == "__main__":
    from dsllm.errors import run_cli

    sys.exit(run_cli(main))
