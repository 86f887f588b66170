"""The other multi-host launch paths, as far as a real cluster goes: MPI (plain `mpirun` with rank
discovery through mpi4py, and `deepspeed --launcher openmpi`) and the hostfile + pdsh path over ssh
to an sshd this test starts on loopback with a throwaway key. Each must match one host, two ranks."""

import json
import os
import shutil
import subprocess
import time

import pytest
from conftest import ROOT
from runs import MULTINODE_ARGS, VENV_BIN, command, env, free_port, train_records

pytestmark = [pytest.mark.multirank, pytest.mark.multinode]

ARGS = MULTINODE_ARGS


@pytest.fixture(scope="module")
def reference(shared_run):
    """One host, two ranks (the session's run: test_two_hosts.py compares with it too)."""
    return train_records(shared_run(*ARGS, ranks=2))


def assert_same_losses(out, reference):
    records = train_records(out)
    assert sorted(records) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert records[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step


def need_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install -e '.[mpi]'); .ci/run installs it")
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun (apt-get install openmpi-bin libopenmpi-dev); .ci/run installs it")


def test_plain_mpirun_discovers_ranks_through_mpi4py(dataset_dir, tmp_path, reference):
    need_mpi()
    out = tmp_path / "run"
    train = command(dataset_dir, out, *ARGS)
    variables = [name for name in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR") if name in env()]
    cmd = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "2",
        *[arg for name in variables for arg in ("-x", name)],
        "-x",
        f"MASTER_PORT={free_port()}",
        *train,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 rank(s)" in proc.stdout
    assert_same_losses(out, reference)


def test_deepspeed_launcher_with_openmpi(dataset_dir, tmp_path, reference):
    need_mpi()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "run"
    cmd = [
        str(VENV_BIN / "deepspeed"),
        "--hostfile",
        str(hostfile),
        "--launcher",
        "openmpi",
        "--force_multi",
        "--no_ssh_check",
        "--launcher_args=--allow-run-as-root --oversubscribe",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *command(dataset_dir, out, *ARGS)[1:],
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_losses(out, reference)


@pytest.fixture
def sshd(tmp_path):
    """An sshd on 127.0.0.1 that accepts one throwaway key for this user; stopped afterwards."""
    if shutil.which("sshd") is None and not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("no sshd (apt-get install openssh-server); .ci/run installs it")
    if shutil.which("pdsh") is None:
        pytest.skip("no pdsh (apt-get install pdsh); .ci/run installs it")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "user.pub").read_text())
    os.chmod(keys / "authorized_keys", 0o600)
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    port = free_port()
    daemon = subprocess.Popen(
        [
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            "/dev/null",
            "-p",
            str(port),
            "-h",
            str(keys / "host"),
            "-o",
            "ListenAddress=127.0.0.1",
            "-o",
            f"AuthorizedKeysFile={keys / 'authorized_keys'}",
            "-o",
            "StrictModes=no",
            "-o",
            "PermitRootLogin=prohibit-password",
            "-o",
            f"PidFile={keys / 'sshd.pid'}",
            "-o",
            "UsePAM=no",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = [
        "-i",
        str(keys / "user"),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "BatchMode=yes",
    ]
    for _ in range(50):
        if subprocess.run(["ssh", "-p", str(port), *client, "127.0.0.1", "true"], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    else:
        daemon.kill()
        pytest.fail("sshd did not accept the key: " + (daemon.stdout.read() if daemon.stdout else ""))
    yield {"port": port, "client": client}
    daemon.kill()
    daemon.wait()


def test_hostfile_pdsh_over_ssh(dataset_dir, tmp_path, reference, sshd):
    """Two "hosts" (127.0.0.1 and localhost, one slot each) reached with pdsh over ssh, as on a cluster."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    ds_env = tmp_path / "deepspeed_env"  # what every remote rank must see, as a .deepspeed_env file
    ds_env.write_text(
        "".join(
            f"{k}={env()[k]}\n" for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR") if k in env()
        )
    )
    out = tmp_path / "run"
    # --no_ssh_check: the launcher's reachability probe runs plain `ssh host` (no key option); pdsh gets the key
    cmd = [
        str(VENV_BIN / "deepspeed"),
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "127.0.0.1",
        "--no_ssh_check",
        "--master_port",
        str(free_port()),
        "--ssh_port",
        str(sshd["port"]),
        *command(dataset_dir, out, *ARGS)[1:],
    ]
    run_env = {**env(), "DS_ENV_FILE": str(ds_env), "PDSH_SSH_ARGS_APPEND": " ".join(sshd["client"])}
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pdsh" in proc.stdout + proc.stderr
    assert_same_losses(out, reference)


def test_preflight_checks_every_host(dataset_dir, tmp_path, sshd):
    ssh = ["--ssh-port", str(sshd["port"]), "--ssh-option", " ".join(sshd["client"])]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")

    def preflight(*args):
        return subprocess.run(
            [
                str(VENV_BIN / "python"),
                "launch/preflight.py",
                "--hostfile",
                str(hostfile),
                "--data",
                str(dataset_dir),
                *ssh,
                *map(str, args),
            ],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    proc = preflight("--ds_config", "ds_configs/zero2.json", "--micro-batch-size", 4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world size 2" in proc.stdout and "batch: 4 per rank x 1 accumulation x 2 ranks = 8" in proc.stdout
    assert proc.stdout.count(" ok  code ") == 2 and "NCCL/GLOO variables here" in proc.stdout
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")  # nothing answers ssh on .2
    ds = tmp_path / "ds.json"
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config.update(train_batch_size=12, train_micro_batch_size_per_gpu=4)
    ds.write_text(json.dumps(config))
    proc = preflight("--ds_config", ds)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "pre-flight found 2 problem(s)" in line and "127.0.0.2: not reachable over ssh" in line
    assert (
        "train_batch_size 12 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 1 "
        "x data-parallel world size 2" in line
    )
