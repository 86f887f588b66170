"""Training checkpoints on disk: which ones are complete, healthy and on the run's chosen branch.

A checkpoint is a DeepSpeed tag folder `checkpoints/stepNNNNNNNN` plus our marker, `dsllm_complete.json`.
It is written as `stepNNNNNNNN.staging` and renamed into place only once every rank has finished and
the marker (with each file's size and sha256) is inside it, so a `stepN` folder is either complete or
absent, and an existing one is never overwritten in place. `lineage.json` records the run's branches:
resuming from an older checkpoint starts a new branch, and `--resume auto` follows the newest branch
back through the checkpoints it descends from, never into an abandoned one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from dsllm.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "dsllm_complete.json"
LINEAGE_FILE = "lineage.json"
STAGING_SUFFIX = ".staging"
REPLACED_SUFFIX = ".replaced"
_TAG = re.compile(r"step(\d{8})")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag_dir: Path) -> int | None:
    """The step of a checkpoint folder named exactly `stepNNNNNNNN`, else None (staging, replaced, other)."""
    match = _TAG.fullmatch(Path(tag_dir).name)
    return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class Marker:
    """`dsllm_complete.json`, written last into a checkpoint: what it holds and where it came from."""

    step: int
    consumed_samples: int  # global samples (rows) the training data handed out before this checkpoint
    world_size: int
    zero_stage: int
    precision: str
    model: dict  # ModelConfig.to_dict(): a resumed run must build the same model
    train_fingerprint: str  # the training data (token files, or the packed fine-tuning rows)
    branch: str | None  # lineage.json's branch this checkpoint belongs to
    previous: str | None  # the tag this run resumed from or last saved before this one
    val_loss: float | None  # the last validation loss before this checkpoint, None before the first evaluation
    files: dict[str, list]  # {relative path: [size, sha256]} of every other file of the checkpoint
    kind: str = "pretrain"  # or "finetune"
    pipeline_stages: int = 1  # DeepSpeed pipeline stages: the weights are in per-layer files (layer_NN-*)
    tensor_parallel: int = 1  # AutoTP ranks: each holds a shard of the weights (mp_rank_NN files)
    expert_parallel: int = 1  # MoE ep_size: each rank saved its experts (layer_L_expert_E_* files, E global)
    sequence_parallel: int = 1  # DeepSpeed-Ulysses sequence groups (the files are those of as many plain ranks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, tag_dir: Path) -> Marker | None:
        """The marker of a checkpoint folder, or None when it is missing, unreadable or lacks a field."""
        data = read_marker(tag_dir)
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in (data or {}).items() if k in names})
        except TypeError:
            return None


def write_json_atomic(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def read_marker(tag_dir: Path) -> dict | None:
    """The marker of a checkpoint folder, or None when it is missing or unreadable."""
    try:
        marker = json.loads((Path(tag_dir) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Tag folders that hold a marker (written last, inside the staging folder), oldest first."""
    if not Path(checkpoints).is_dir():
        return []
    tags = [
        p
        for p in Path(checkpoints).iterdir()
        if p.is_dir() and step_of(p) is not None and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(tags, key=step_of)


# -- the manifest: what each file should be ------------------------------------------------------------
def checkpoint_files(tag_dir: Path) -> list[str]:
    """Every file of a checkpoint folder (relative, sorted) except the marker."""
    tag_dir = Path(tag_dir)
    return sorted(
        str(p.relative_to(tag_dir))
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name not in (COMPLETE_MARKER, COMPLETE_MARKER + ".partial")
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(tag_dir: Path, names: list[str]) -> dict[str, list]:
    """{name: [size, sha256]} for these files of a checkpoint folder (each rank hashes its share)."""
    return {name: [(Path(tag_dir) / name).stat().st_size, sha256_file(Path(tag_dir) / name)] for name in names}


def size_problem(tag_dir: Path, marker: Marker) -> str | None:
    """What is wrong with a checkpoint by its files' presence and sizes (cheap), or None."""
    files = marker.files
    if not isinstance(files, dict):
        return None  # written before manifests existed: nothing to compare
    for name, (size, _) in sorted(files.items()):
        path = Path(tag_dir) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker recorded {size}"
    return None


def checksum_problem(tag_dir: Path, marker: Marker, names: list[str]) -> str | None:
    """The first of these files whose sha256 differs from the marker's, or None."""
    files = marker.files if isinstance(marker.files, dict) else {}
    for name in names:
        if name in files and sha256_file(Path(tag_dir) / name) != files[name][1]:
            return f"{name} does not match its recorded sha256 (damaged after it was written)"
    return None


# -- lineage: the run's branches -----------------------------------------------------------------------
def read_lineage(checkpoints: Path) -> list[dict] | None:
    """The run's branches, oldest first ({"id", "parent", "forked_from"}), or None for a run without them."""
    try:
        branches = json.loads((Path(checkpoints) / LINEAGE_FILE).read_text())["branches"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return branches if isinstance(branches, list) and branches else None


def lineage_candidates(checkpoints: Path) -> list[Path]:
    """The checkpoints `--resume auto` may use, newest first: the current branch's, then those of the branch it
    forked from up to the fork point, and so on back to the start. Without lineage: every complete checkpoint."""
    done = complete_checkpoints(checkpoints)
    branches = read_lineage(checkpoints)
    if branches is None:
        return done[::-1]
    by_id = {b["id"]: b for b in branches}
    markers = {p: read_marker(p) or {} for p in done}
    result, branch, limit = [], branches[-1], None
    while branch is not None:
        result += [
            p
            for p in done[::-1]
            if markers[p].get("branch") == branch["id"] and (limit is None or step_of(p) <= limit) and p not in result
        ]
        fork = branch.get("forked_from")
        if fork is None:
            break
        limit = step_of(Path(fork))
        branch = by_id.get(branch.get("parent"))
        if branch is None:  # forked from another run's checkpoint: only that one, if it is in this folder
            forked = Path(checkpoints) / fork
            if forked in markers and forked not in result:
                result.append(forked)
    return result


def start_branch(checkpoints: Path, forked_from: Path | None) -> str:
    """Record a new branch (rank 0, before training): the current one from now on. Returns its id."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    branches = read_lineage(checkpoints) or []
    marker = read_marker(forked_from) if forked_from is not None else None
    inside = forked_from is not None and Path(forked_from).resolve().parent == checkpoints.resolve()
    branch = {
        "id": uuid.uuid4().hex[:12],
        "parent": (marker or {}).get("branch"),
        "forked_from": (Path(forked_from).name if inside else str(Path(forked_from).resolve()))
        if forked_from is not None
        else None,
    }
    write_json_atomic(checkpoints / LINEAGE_FILE, {"branches": branches + [branch]})
    return branch["id"]


def current_branch(checkpoints: Path) -> str | None:
    branches = read_lineage(checkpoints)
    return branches[-1]["id"] if branches else None


# -- choosing where to resume --------------------------------------------------------------------------
def resume_candidates(resume: str, run_dir: Path) -> tuple[list[Path], bool]:
    """(checkpoints to try, newest first; whether the choice was explicit). `auto`: the current branch's
    lineage (falling back to older ones when the newest is damaged); `none`: a fresh start, refused when
    the run has checkpoints; a path: that tag folder, or the newest complete one of a run or checkpoints folder."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    if resume == "auto":
        return lineage_candidates(checkpoints), False
    if resume == "none":
        if complete_checkpoints(checkpoints):
            raise UserError(
                f"{checkpoints}: the run already has checkpoints; pass --resume auto to continue it, "
                "or choose a new --out"
            )
        return [], True
    path = Path(resume)
    if (path / COMPLETE_MARKER).is_file():
        return [path], True
    done = complete_checkpoints(path) or complete_checkpoints(path / CHECKPOINTS_DIR)
    if not done:
        hint = " (it is unfinished: a staging folder is never resumed)" if path.name.endswith(STAGING_SUFFIX) else ""
        raise UserError(
            f"--resume {resume}: no complete checkpoint there{hint}; pass a checkpoints/stepNNNNNNNN folder, "
            "a run folder, auto or none"
        )
    return [done[-1]], True


def continues_branch(checkpoints: Path, resume_from: Path | None) -> bool:
    """Whether resuming from this checkpoint continues the current branch (it is the branch's newest
    checkpoint) rather than rolling back, which starts a new branch."""
    if resume_from is None or read_lineage(checkpoints) is None:
        return False
    candidates = lineage_candidates(checkpoints)
    return bool(candidates) and candidates[0].resolve() == Path(resume_from).resolve()


# -- writing -------------------------------------------------------------------------------------------
def staging_dir(checkpoints: Path, step: int) -> Path:
    return Path(checkpoints) / (tag_for(step) + STAGING_SUFFIX)


def commit(staging: Path, marker: Marker) -> Path:
    """Write the marker into a finished staging folder and rename it into place (rank 0, after every rank
    wrote its files). A folder of the same name (a branch abandoned by a rollback) is replaced only now."""
    final = staging.with_name(staging.name[: -len(STAGING_SUFFIX)])
    write_json_atomic(staging / COMPLETE_MARKER, marker.to_dict())
    _fsync_dir(staging)
    _fault("marked", step_of(final))
    if final.exists():
        replaced = final.with_name(final.name + REPLACED_SUFFIX)
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
        _fault("replaced", step_of(final))
        os.rename(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(staging, final)
    _fsync_dir(final.parent)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(phase: str, step: int | None) -> None:
    """Test hook: DSLLM_FAULT=kill_in_save:STEP:PHASE dies here (SIGKILL) at that step."""
    if os.environ.get("DSLLM_FAULT") == f"kill_in_save:{step}:{phase}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def remove_leftovers(checkpoints: Path) -> None:
    """Staging and replaced folders of saves that died (rank 0, when no save is running)."""
    if not Path(checkpoints).is_dir():
        return
    for p in Path(checkpoints).iterdir():
        if p.is_dir() and p.name.endswith((STAGING_SUFFIX, REPLACED_SUFFIX)):
            shutil.rmtree(p, ignore_errors=True)


def prune(checkpoints: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints of the current lineage; older ones of it go. Checkpoints of
    abandoned branches are left for the user (a new save of the same step replaces one)."""
    if keep_last < 1:
        return
    for old in lineage_candidates(checkpoints)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
        for derived in old.parent.glob(f"{old.name}-universal*"):  # its universal conversions (cached copies)
            shutil.rmtree(derived, ignore_errors=True)
