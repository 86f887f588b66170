"""The launch scripts: each builds the command its cluster kind needs (DRY_RUN=1 prints it), and the Slurm
script requeues a run stopped with a checkpoint. Its real run on two "nodes" is in
tests/multinode/test_launch_scripts_runs.py."""

import os
import subprocess

from conftest import ROOT
from runs import env


def dry_run(script, *args, **variables):
    proc = subprocess.run(
        ["bash", f"launch/{script}", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "DRY_RUN": "1", **variables},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_single_node_scripts():
    assert dry_run("single_node_a100.sh", "--max-steps", 5) == (
        "deepspeed --num_gpus 8 launch/pretrain.py --ds_config ds_configs/zero2.json --max-steps 5"
    )
    assert dry_run("single_node_4090.sh", "--x", NUM_GPUS="2") == (
        "deepspeed --num_gpus 2 launch/pretrain.py --ds_config ds_configs/zero2.json --x"
    )
    assert "--ds_config ds_configs/zero3_offload.json" in dry_run("single_node_4090.sh", OFFLOAD="1", NUM_GPUS="4")
    assert dry_run("single_node_4090.sh").startswith("deepspeed --num_gpus 1 ")  # no nvidia-smi here: one GPU
    env_lines = (ROOT / "launch" / "single_node_4090.sh").read_text()
    assert "export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-1}" in env_lines


def test_multi_node_scripts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# cluster\nnode-a slots=8\nnode-b slots=8\n")
    assert dry_run("multinode_hostfile.sh", hostfile, "--y") == (
        f"deepspeed --hostfile {hostfile} --master_addr node-a --master_port 29500 launch/pretrain.py "
        "--ds_config ds_configs/zero2.json --y"
    )
    assert dry_run("multinode_hostfile.sh", hostfile, "--y", TP="8", PP="2").endswith(
        "launch/pretrain.py --ds_config ds_configs/zero1.json --tensor-parallel 8 --pipeline-parallel 2 --y"
    )  # 3D: tensor parallelism inside each node, a pipeline stage per node
    mpi = dry_run("multinode_mpi.sh", hostfile, "--y")
    assert mpi.startswith(f"mpirun -np 16 --hostfile {hostfile} --map-by ppr:8:node")
    assert mpi.endswith("launch/pretrain.py --ds_config ds_configs/zero2.json --y")


def test_shard_preparation_script_runs_one_shard_per_array_task_then_the_merge():
    """Task I of an array 0-(K-1) prepares shard I of K (its CPUs as workers); `--merge` runs the merge."""
    array = dict(SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_MAX="3", SLURM_CPUS_PER_TASK="6")
    task = dry_run("prepare_shards.sbatch", "--input", "c", "--output", "d", **array)
    assert task == "python data_pipeline/prepare.py --num-shards 4 --shard-index 2 --workers 6 --input c --output d"
    rerun = dry_run("prepare_shards.sbatch", SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_MAX="5", NUM_SHARDS="16")
    assert rerun.startswith("python data_pipeline/prepare.py --num-shards 16 --shard-index 5 ")
    assert (
        dry_run("prepare_shards.sbatch", "--merge", "--output", "d")
        == "python data_pipeline/merge_shards.py --output d"
    )
    bare = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "launch/prepare_shards.sbatch"], cwd=ROOT, env=bare, capture_output=True, text=True)
    assert proc.returncode == 2 and "sbatch --array=0-(K-1)" in proc.stderr


def test_every_variable_a_script_sets_is_explained():
    for script in (
        "single_node_a100.sh",
        "single_node_4090.sh",
        "multinode_hostfile.sh",
        "multinode_mpi.sh",
        "slurm.sbatch",
    ):
        for line in (ROOT / "launch" / script).read_text().splitlines():
            if line.startswith("export "):
                assert "  # " in line, f"{script}: {line}"


def test_slurm_script_requeues_a_run_stopped_with_a_checkpoint(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nprintf 'node1\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 75\n")  # every rank saved on SIGUSR1 and exited with 75
    for shim in ("scontrol", "srun"):
        os.chmod(bin_dir / shim, 0o755)
    variables = {
        **env(),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "HOSTFILE": str(tmp_path / "hostfile.42"),
    }
    proc = subprocess.run(
        ["bash", "launch/slurm.sbatch", "--max-steps", "4"],
        cwd=ROOT,
        env=variables,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 75, proc.stderr
    assert "requeue 42" in calls.read_text() and "requeueing job 42" in proc.stderr
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # a failure is not requeued
    calls.unlink()
    proc = subprocess.run(
        ["bash", "launch/slurm.sbatch"], cwd=ROOT, env=variables, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "requeue" not in calls.read_text()
