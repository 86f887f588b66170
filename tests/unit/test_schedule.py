"""Learning-rate schedules as phases (dsllm.schedule): the cosine default gives the factors dsllm gave before phases
to the bit, wsd's phases meet at their boundaries, 1-sqrt is its formula, phase files read with "rest" and fractions,
a cooldown cut off a stable phase keeps the past, and the engine's LambdaLR checkpoints its step, not its phases."""

import math

import pytest
import torch

from dsllm.engine import lr_factor
from dsllm.schedule import cosine, phases_of, recorded_phases, resolve, wsd
from dsllm.train_config import TrainConfig


def cosine_before_phases(warmup: int, max_steps: int, min_lr_ratio: float):
    """dsllm.engine.cosine_schedule as it was before schedules were phases: the reference the default must match."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@pytest.mark.parametrize(
    "warmup, max_steps, floor",
    [(15, 300, 0.1), (0, 50, 0.1), (1, 1, 0.1), (5, 1, 0.3), (10, 100, 0.0), (3, 7, 0.37), (50, 1000, 1.0)],
)
def test_cosine_is_the_factors_of_before_to_the_bit(warmup, max_steps, floor):
    before, now = cosine_before_phases(warmup, max_steps, floor), cosine(warmup, max_steps, floor)
    assert [now.factor(s) for s in range(max_steps + 5)] == [before(s) for s in range(max_steps + 5)]


def test_the_default_schedule_is_cosine_with_five_percent_warmup():
    config = TrainConfig(ds_config="x.json", max_steps=300)
    before = cosine_before_phases(15, 300, 0.1)
    assert [config.lr_schedule().factor(s) for s in range(301)] == [before(s) for s in range(301)]


def test_wsd_warms_up_holds_and_decays_over_its_last_fraction():
    config = TrainConfig(ds_config="x.json", max_steps=100, schedule="wsd", warmup_steps=10, decay_shape="linear")
    schedule = config.lr_schedule()  # --decay-fraction 0.2: the last 20 steps
    assert [(p.shape, p.start, p.end) for p in schedule.phases] == [
        ("linear", 0, 10),
        ("constant", 10, 80),
        ("linear", 80, 100),
    ]
    assert schedule.factor(0) == 1 / 11 and schedule.factor(9) == 10 / 11  # the warmup never trains at lr 0
    assert schedule.factor(10) == schedule.factor(79) == schedule.factor(80) == 1.0
    assert schedule.factor(90) == pytest.approx(1 - 0.9 * 0.5) and schedule.factor(100) == 0.1
    assert schedule.factor(500) == 0.1  # past the end: the floor


def test_one_minus_sqrt_and_cosine_decays():
    one_minus_sqrt = wsd(0, 100, 50, "1-sqrt", 0.0)
    assert [one_minus_sqrt.factor(s) for s in (50, 62, 75, 100)] == pytest.approx(
        [1.0, 1 - math.sqrt(12 / 50), 1 - math.sqrt(0.5), 0.0]
    )
    cosine_decay = wsd(0, 100, 50, "cosine", 0.2)
    assert cosine_decay.factor(75) == pytest.approx(0.2 + 0.8 * 0.5) and cosine_decay.factor(100) == pytest.approx(0.2)
    assert resolve("wsd", warmup=5, max_steps=100, min_lr_ratio=0.1, decay_fraction=0.5, decay_steps=10,
                   decay_shape="linear").phases[-1].start == 90  # fmt: skip


def test_a_phases_file_takes_counts_fractions_and_the_rest():
    schedule = phases_of(
        [
            {"steps": 10, "shape": "linear", "to": 1},
            {"steps": "rest", "shape": "constant"},
            {"steps": 0.25, "shape": "cosine", "to": 0.0},
        ],
        200,
        "--schedule x.json",
    )
    assert [(p.start, p.steps, p.start_factor, p.end_factor) for p in schedule.phases] == [
        (0, 10, 0.0, 1.0),
        (10, 140, 1.0, 1.0),
        (150, 50, 1.0, 0.0),
    ]
    assert recorded_phases({"phases": schedule.to_list()}, "config.json") == schedule  # config.json reads back


def test_a_cooldown_keeps_the_stable_past_and_decays_from_the_checkpoint():
    source = wsd(10, 100, 20, "linear", 0.1)
    branch = source.cut_for_decay(40, 8, "1-sqrt", 0.05, "--decay-from x")
    assert [branch.factor(s) for s in range(40)] == [source.factor(s) for s in range(40)]
    assert branch.factor(40) == 1.0 and branch.factor(48) == 0.05 and branch.steps == 48
    assert branch.factor(42) == pytest.approx(0.05 + 0.95 * (1 - math.sqrt(2 / 8)))


def test_the_lambda_lr_checkpoints_its_step_and_keeps_the_branch_phases():
    """DeepSpeed saves the scheduler's state_dict: last_epoch comes back, the factor function stays the run's own."""
    weight = torch.zeros(1, requires_grad=True)
    source = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([weight], lr=1.0), lr_factor(wsd(2, 20, 4, "linear", 0)))
    for _ in range(10):
        source.optimizer.step()
        source.step()
    state = source.state_dict()
    assert state["last_epoch"] == 10 and state["lr_lambdas"] == [None]  # a function: not saved, not overwritten
    branch_schedule = wsd(2, 20, 4, "linear", 0).cut_for_decay(10, 5, "linear", 0.0, "x")
    branch = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([weight], lr=1.0), lr_factor(branch_schedule))
    branch.load_state_dict(state)
    branch.optimizer.step()
    branch.step()
    assert branch.last_epoch == 11 and branch.get_last_lr() == [pytest.approx(0.8)]


def test_a_branch_starts_at_its_checkpoint_and_resumes_its_own(tmp_path):
    """--decay-from's first start resumes the source checkpoint to step + decay; killed, it resumes its own
    checkpoints with the phases its config.json recorded (the source checkpoint may be pruned by then)."""
    import json

    from dsllm.checkpoint.store import COMPLETE_MARKER
    from dsllm.cooldown import branch_of

    source = wsd(2, 100, 20, "linear", 0.1)
    checkpoint = tmp_path / "stable" / "checkpoints" / "step00000040"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 40}))
    (tmp_path / "stable" / "config.json").write_text(json.dumps({"schedule": {"phases": source.to_list()}}))
    options = dict(ds_config="x.json", out=str(tmp_path / "cool"), decay_from=str(checkpoint), decay_fraction=0.2)
    config, branch = branch_of(TrainConfig(**options, decay_shape="cosine"))
    assert (config.max_steps, config.resume, branch.start, branch.decay_start) == (50, str(checkpoint), checkpoint, 40)
    assert [p.shape for p in branch.schedule.phases] == ["linear", "constant", "cosine"]  # 10 = 20% of 50 steps

    own = tmp_path / "cool" / "checkpoints" / "step00000045"  # killed after its checkpoint at step 45
    own.mkdir(parents=True)
    (own / COMPLETE_MARKER).write_text(json.dumps({"step": 45}))
    recorded = {"train": {"decay_from": str(checkpoint)}, "schedule": {"phases": branch.schedule.to_list()}}
    (tmp_path / "cool" / "config.json").write_text(json.dumps(recorded))
    (checkpoint / COMPLETE_MARKER).unlink()  # pruned by the source run since
    again, resumed = branch_of(TrainConfig(**options, decay_shape="linear"))
    assert (again.max_steps, again.resume, resumed.start) == (50, "auto", None)
    assert resumed.schedule == branch.schedule  # the recorded phases, not today's --decay-shape


def test_a_resume_on_other_phases_is_said(tmp_path):
    """A wsd run resumed with more steps keeps its past (a longer stable phase); a cosine one does not: a note."""
    import json

    recorded = tmp_path / "config.json"
    recorded.write_text(json.dumps({"schedule": {"phases": wsd(10, 100, 20, "linear", 0.1).to_list()}}))
    assert wsd(10, 200, 20, "linear", 0.1).change_note(recorded, 50) is None
    assert wsd(10, 100, 20, "linear", 0.1).change_note(recorded, 100) is None
    assert "the steps from here follow the new one" in wsd(10, 200, 20, "linear", 0.1).change_note(recorded, 90)
    recorded.write_text(json.dumps({"schedule": {"phases": cosine(10, 100, 0.1).to_list()}}))
    note = cosine(10, 200, 0.1).change_note(recorded, 50)
    assert note.startswith("note: the lr schedule differs from the one this run trained its first 50 steps with")
    assert cosine(10, 100, 0.1).change_note(tmp_path / "none.json", 50) is None
