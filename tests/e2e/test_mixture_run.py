"""Pretraining on a weighted mixture of three sources (tests/conftest.py `mixture_dirs`) with a schedule that moves the
weights onto one source at step 10: the per-source token counts in metrics.jsonl change share there, every evaluation
logs each source's validation loss, a run killed with -9 at step 9 and resumed continues bit for bit across the
switch, and 2 ranks train on the same global batches as 1."""

import json

import pytest
from runs import killed_then_resumed, pretrain, train_records

STEPS, SWITCH, GLOBAL_BATCH, SEQ_LEN = 14, 10, 8, 32
FIRST = {"web": 0.6, "code": 0.3, "books": 0.1}
LATER = {"web": 0.1, "code": 0.1, "books": 0.8}  # e.g. an anneal onto the best data
RUN = ["--max-steps", STEPS, "--precision", "fp32", "--eval-interval", 7, "--save-interval", 4]
RUN += ["--max-epochs-warning", 0.1]  # books passes a tenth of an epoch after the switch: the warning, once


def mixture_file(dirs, folder):
    sources = {name: {"path": str(dirs[name]), "weight": weight} for name, weight in FIRST.items()}
    path = folder / "mix.json"
    path.write_text(json.dumps({"sources": sources, "schedule": [{"at_step": SWITCH, "weights": LATER}]}))
    return path


@pytest.fixture(scope="module")
def reference(mixture_dirs, tmp_path_factory):
    """The uninterrupted 1-rank run: (its mixture file, its run folder, its stdout)."""
    folder = tmp_path_factory.mktemp("mixture-run")
    mix = mixture_file(mixture_dirs, folder)
    proc = pretrain(mix, folder / "reference", *RUN, "--micro-batch-size", 4, "--grad-accum", 2)
    return mix, folder / "reference", proc.stdout


def shares(first: dict, last: dict) -> dict[str, float]:
    read = {name: last[name]["tokens"] - (first[name]["tokens"] if first else 0) for name in last}
    return {name: tokens / sum(read.values()) for name, tokens in read.items()}


def test_the_schedule_shows_in_the_token_counts_and_every_source_is_validated(reference):
    mix, run, stdout = reference
    records = train_records(run)
    sources = {step: records[step]["sources"] for step in records}
    assert all(sum(s["tokens"] for s in sources[step].values()) == step * GLOBAL_BATCH * SEQ_LEN for step in sources)
    before, after = shares(None, sources[SWITCH]), shares(sources[SWITCH], sources[STEPS])
    assert before["books"] < 0.2 and before["web"] > 0.45, before  # 80 samples at 0.6/0.3/0.1
    assert after["books"] > 0.6 and after["web"] < 0.25, after  # 32 samples at 0.1/0.1/0.8
    assert stdout.count("warning: source books has been read") == 1 and "source web has been read" not in stdout
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [e["step"] for e in evals] == [7, 14]
    for e in evals:  # 8 windows of each source's val split: the sources count alike in val_loss
        by_source = e["val_loss_by_source"]
        assert sorted(by_source) == ["books", "code", "web"]
        assert e["val_loss"] == pytest.approx(sum(by_source.values()) / 3, rel=1e-9)
    assert "| by source: books " in stdout
    mixture = json.loads((run / "config.json").read_text())["data"]["mixture"]
    assert (
        mixture["schedule"][0]["start_sample"] == SWITCH * GLOBAL_BATCH and mixture["sources"]["web"]["weight"] == 0.6
    )


def test_kill_9_and_resume_continue_exactly_across_the_switch(reference, tmp_path):
    mix, run, _ = reference
    killed_then_resumed(mix, tmp_path / "killed", *RUN, "--micro-batch-size", 4, "--grad-accum", 2)
    ours, theirs = train_records(tmp_path / "killed"), train_records(run)
    assert sorted(ours) == list(range(1, STEPS + 1))
    assert all(ours[s]["loss"] == theirs[s]["loss"] and ours[s]["sources"] == theirs[s]["sources"] for s in ours)


@pytest.mark.multirank
def test_two_ranks_train_on_the_same_global_batches(reference, tmp_path):
    mix, run, _ = reference
    pretrain(mix, tmp_path / "two", *RUN, "--micro-batch-size", 2, "--grad-accum", 2, ranks=2)
    ours, theirs = train_records(tmp_path / "two"), train_records(run)
    for step in range(1, STEPS + 1):
        assert ours[step]["sources"] == theirs[step]["sources"]
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=1e-5), step
