"""The Slurm script really runs: a stand-in `scontrol` and `srun` start one launcher per "node" here, and the
two nodes train as one job of two ranks (the commands the scripts build are in tests/unit/test_launch_scripts.py)."""

import os
import subprocess

import pytest
from conftest import ROOT
from runs import SMALL_MODEL, VENV_BIN, env, free_port, train_records

pytestmark = [pytest.mark.multirank, pytest.mark.multinode, pytest.mark.slow]


def test_slurm_script_runs_one_launcher_per_node(dataset_dir, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf '127.0.0.1\\nlocalhost\\n'\n")
    # srun: run the per-node command once per node, as Slurm would on each allocated host
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nfor i in 0 1; do SLURM_NODEID=$i "${@: -3}" & done\nwait -n && wait -n\n'
    )
    for shim in ("scontrol", "srun"):
        os.chmod(bin_dir / shim, 0o755)
    out = tmp_path / "run"
    variables = {
        **env(),
        "PATH": f"{bin_dir}:{VENV_BIN}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_CPUS_PER_TASK": "2",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "GPUS_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "HOSTFILE": str(tmp_path / "hostfile.42"),
    }
    args = [
        "--data",
        dataset_dir,
        "--out",
        out,
        *SMALL_MODEL,
        "--seq-len",
        32,
        "--max-steps",
        4,
        "--micro-batch-size",
        4,
        "--precision",
        "fp32",
        "--sample-tokens",
        0,
        "--log-interval",
        1,
    ]
    proc = subprocess.run(
        ["bash", "launch/slurm.sbatch", *map(str, args)],
        cwd=ROOT,
        env=variables,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "hostfile.42").read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"
    assert "--loader-workers 1" in proc.stdout + proc.stderr
    assert "on 2 rank(s)" in proc.stdout
    assert sorted(train_records(out)) == [1, 2, 3, 4]
