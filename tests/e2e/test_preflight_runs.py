"""Pre-flight under the `deepspeed` launcher with two ranks: both find the fault before the process group exists,
and the user reads it once (the single-process checks are in tests/unit/test_preflight.py)."""

import subprocess

import pytest
from conftest import ROOT
from runs import SMALL_MODEL, VENV_BIN, env, free_port, write_ds

pytestmark = pytest.mark.multirank


def test_batch_error_under_the_launcher_with_two_ranks(tmp_path, dataset_dir):
    """Both ranks find the fault before the process group exists; the user reads it once."""
    ds = write_ds(tmp_path, train_batch_size=12, train_micro_batch_size_per_gpu=4)
    proc = subprocess.run(
        [
            str(VENV_BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "launch/pretrain.py",
            "--ds_config",
            str(ds),
            "--data",
            str(dataset_dir),
            "--out",
            str(tmp_path / "out"),
            *SMALL_MODEL,
            "--seq-len",
            "32",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: batch arithmetic: train_batch_size 12 != train_micro_batch_size_per_gpu 4 x "
        "gradient_accumulation_steps 1 x data-parallel world size 2; make train_batch_size a multiple of "
        'micro-batch x world size (8), or set it to "auto"'
    ], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
