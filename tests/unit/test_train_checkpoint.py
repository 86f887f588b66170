"""Training checkpoints on disk (pure file logic; tests/e2e/test_preemption.py runs the trainer for real):
staging folders never count, markers carry sizes and checksums, prune keeps the lineage, and --resume auto
after a rollback follows the branch the user chose."""

import json

import pytest

from dsllm.checkpoint.store import (
    COMPLETE_MARKER,
    LINEAGE_FILE,
    Marker,
    checksum_problem,
    commit,
    complete_checkpoints,
    file_digests,
    lineage_candidates,
    prune,
    remove_leftovers,
    resume_candidates,
    size_problem,
    staging_dir,
    start_branch,
)
from dsllm.errors import UserError


def save(checkpoints, step, branch, payload=b"weights"):
    """What the trainer does: files into a staging folder, then the marker and one rename."""
    staging = staging_dir(checkpoints, step)
    staging.mkdir(parents=True)
    (staging / "mp_rank_00_model_states.pt").write_bytes(payload + str(step).encode())
    files = file_digests(staging, ["mp_rank_00_model_states.pt"])
    marker = Marker(
        step=step,
        consumed_samples=step * 8,
        world_size=1,
        zero_stage=0,
        precision="fp32",
        model={},
        train_fingerprint="data",
        branch=branch,
        previous=None,
        val_loss=None,
        files=files,
    )
    return commit(staging, marker)


def names(paths):
    return [p.name for p in paths]


def test_staging_and_torn_folders_never_count_and_prune_keeps_the_newest(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    branch = start_branch(checkpoints, None)
    for step in (2, 4, 6, 8):
        save(checkpoints, step, branch)
    staging_dir(checkpoints, 10).mkdir()  # a save that died before its marker
    (checkpoints / "step00000007").mkdir()  # a folder with no marker
    assert names(complete_checkpoints(checkpoints)) == ["step00000002", "step00000004", "step00000006", "step00000008"]
    for converted in ("step00000002-universal", "step00000002-universal-gpt", "step00000006-universal"):
        (checkpoints / converted).mkdir()  # universal conversions cached next to their checkpoint
    prune(checkpoints, keep_last=2)
    remove_leftovers(checkpoints)
    assert names(complete_checkpoints(checkpoints)) == ["step00000006", "step00000008"]
    assert sorted(p.name for p in checkpoints.glob("*-universal*")) == ["step00000006-universal"]  # with their step
    assert not staging_dir(checkpoints, 10).exists()
    run = checkpoints.parent
    assert names(resume_candidates("auto", run)[0]) == ["step00000008", "step00000006"]
    assert names(resume_candidates(str(checkpoints / "step00000006"), run)[0]) == ["step00000006"]
    with pytest.raises(UserError, match="already has checkpoints; pass --resume auto"):
        resume_candidates("none", run)
    with pytest.raises(UserError, match="staging folder is never resumed"):
        resume_candidates(str(staging_dir(checkpoints, 12)), run)


def test_the_marker_records_sizes_and_checksums_that_find_damage(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    path = save(checkpoints, 5, start_branch(checkpoints, None))
    assert json.loads((path / COMPLETE_MARKER).read_text())["files"]["mp_rank_00_model_states.pt"][0] == len(
        b"weights5"
    )
    marker = Marker.read(path)
    assert size_problem(path, marker) is None and checksum_problem(path, marker, list(marker.files)) is None
    (path / "mp_rank_00_model_states.pt").write_bytes(b"weightsX")  # same size, other bytes
    assert "does not match its recorded sha256" in checksum_problem(path, marker, list(marker.files))
    (path / "mp_rank_00_model_states.pt").write_bytes(b"short")
    assert "has 5 bytes, the marker recorded 8" in size_problem(path, marker)
    (path / "mp_rank_00_model_states.pt").unlink()
    assert "is missing" in size_problem(path, marker)


def test_a_resave_replaces_the_old_folder_only_once_complete(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    first = start_branch(checkpoints, None)
    save(checkpoints, 10, first, b"old")
    staging = staging_dir(checkpoints, 10)
    staging.mkdir()
    (staging / "mp_rank_00_model_states.pt").write_bytes(b"half-writ")  # the new save is still being written
    assert (checkpoints / "step00000010" / "mp_rank_00_model_states.pt").read_bytes() == b"old10"
    remove_leftovers(checkpoints)
    save(checkpoints, 10, first, b"new")
    assert (checkpoints / "step00000010" / "mp_rank_00_model_states.pt").read_bytes() == b"new10"
    assert sorted(names(checkpoints.iterdir())) == sorted([LINEAGE_FILE, "step00000010"])


def test_auto_after_a_rollback_follows_the_chosen_branch(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    first = start_branch(checkpoints, None)
    for step in (10, 20, 30):
        save(checkpoints, step, first)
    # the user rolls back to step 10: a new branch; until it saves, auto resumes at step 10, not 30
    second = start_branch(checkpoints, checkpoints / "step00000010")
    assert names(lineage_candidates(checkpoints)) == ["step00000010"]
    save(checkpoints, 15, second)
    assert names(lineage_candidates(checkpoints)) == ["step00000015", "step00000010"]
    save(checkpoints, 20, second)  # replaces the abandoned branch's step 20
    assert names(lineage_candidates(checkpoints)) == ["step00000020", "step00000015", "step00000010"]
    prune(checkpoints, keep_last=2)  # the lineage's oldest goes; the abandoned step 30 is left for the user
    assert names(complete_checkpoints(checkpoints)) == ["step00000015", "step00000020", "step00000030"]
    assert names(lineage_candidates(checkpoints)) == ["step00000020", "step00000015"]


@pytest.mark.parametrize("kind", ["FusedAdam", "DeepSpeedCPUAdam"])
def test_a_resumed_cpu_adam_steps_as_the_uninterrupted_one(kind):
    """DeepSpeed's CPU Adam kernels keep beta^t as a running product in the process; a resume at step 10 starts it
    at pow(beta, 11), a bit off for these betas, unless `replay_cpu_adam_clock` replays the product first."""
    import copy
    import types

    import torch
    from deepspeed.ops import adam

    from dsllm.checkpoint.checkpointer import replay_cpu_adam_clock

    def optimizer(param):
        return getattr(adam, kind)([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    torch.manual_seed(0)
    start, grads = torch.randn(256), [torch.randn(256) for _ in range(16)]

    def steps(param, opt, grads):
        for grad in grads:
            param.grad = grad.clone()
            opt.step()

    whole = torch.nn.Parameter(start.clone())
    opt = optimizer(whole)
    steps(whole, opt, grads[:10])
    at_10, saved = whole.detach().clone(), copy.deepcopy(opt.state_dict())
    steps(whole, opt, grads[10:])

    def resumed(replay: bool) -> torch.Tensor:
        param = torch.nn.Parameter(at_10.clone())
        opt = optimizer(param)
        opt.load_state_dict(copy.deepcopy(saved))  # (a loaded state is the same tensors, stepped in place)
        if replay:
            replay_cpu_adam_clock(types.SimpleNamespace(optimizer=opt))
        steps(param, opt, grads[10:])
        return param.detach()

    assert not torch.equal(resumed(replay=False), whole.detach())  # (else this test proves nothing)
    assert torch.equal(resumed(replay=True), whole.detach())
