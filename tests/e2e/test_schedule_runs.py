"""--schedule wsd on a real run: the lr at every step is warmup, stable, decay as the phases say; --decay-from branches
a cooldown off a stable checkpoint into a new run folder, the source folder untouched, and its report lists the phases.
(A WSD run killed with -9 and resumed continues bit for bit on 1 and 2 ranks: tests/e2e/test_optimizer_runs.py, whose
Muon runs use --schedule wsd.)"""

import hashlib
import math
from pathlib import Path

import pytest
from runs import pretrain, report, train_records

RANKS = 1  # 2 passes too (127 s for this file vs 47 s on 1 rank, 2 loaded cores: over the test-time budget)
STEPS, LR, FLOOR = 16, 3e-3, 0.1
RUN = ["--max-steps", STEPS, "--schedule", "wsd", "--warmup-steps", 2, "--decay-steps", 4, "--decay-shape", "linear"]
RUN += ["--min-lr-ratio", FLOOR, "--micro-batch-size", 2, "--grad-accum", 2, "--precision", "fp32"]
RUN += ["--eval-interval", 8, "--save-interval", 4, "--sample-tokens", 0]


def wsd_factor(step: int) -> float:
    """The lr factor after `step` steps: warmup over steps 0-1, stable 2-11, linear decay 12-15, the floor at 16."""
    if step < 2:
        return (step + 1) / 3
    if step < 12:
        return 1.0
    return 1.0 + (FLOOR - 1.0) * min(1.0, (step - 12) / 4)


@pytest.fixture(scope="module")
def reference(dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("wsd") / "reference"
    pretrain(dataset_dir, out, *RUN, ranks=RANKS)
    return out


def folder_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_wsd_lr_is_warmup_then_stable_then_decay(reference):
    uninterrupted = train_records(reference)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    for step, record in uninterrupted.items():
        assert record["lr"] == pytest.approx(LR * wsd_factor(step), rel=1e-12), step


def test_decay_from_a_stable_checkpoint_branches_a_cooldown(reference, dataset_dir, tmp_path):
    source = reference / "checkpoints" / "step00000008"
    before = folder_digests(reference)
    branch = tmp_path / "cooldown"
    proc = pretrain(
        dataset_dir, branch, *RUN, "--decay-from", source, "--decay-steps", 4, "--decay-shape", "cosine", ranks=RANKS
    )
    assert f"resumed from {source}" in proc.stdout
    assert folder_digests(reference) == before  # the source run's folder is only read
    records, uninterrupted = train_records(branch), train_records(reference)
    assert sorted(records) == [9, 10, 11, 12]  # it continues at step 9 and ends where its decay does
    for step in records:  # cosine from the stable lr at step 8 down to the floor at step 12
        factor = FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * (step - 8) / 4))
        assert records[step]["lr"] == pytest.approx(LR * factor, rel=1e-12), step
    # the loss of step 10 is that of the weights step 9 made at the stable lr, as the source's was; step 10 decays
    assert [records[s]["loss"] for s in (9, 10)] == [uninterrupted[s]["loss"] for s in (9, 10)]
    assert records[11]["loss"] != uninterrupted[11]["loss"]

    report(branch, "--no-attention")  # the LR plot shades the phases config.json records; summary.md lists them
    summary = (branch / "report" / "summary.md").read_text()
    assert (
        "- lr schedule: warmup steps 0-2 (linear 0 -> 1 x lr), stable steps 2-8 (constant 1 x lr), "
        "decay steps 8-12 (cosine 1 -> 0.1 x lr)"
    ) in summary
