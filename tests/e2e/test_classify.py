"""Classification fine-tuning (issue 17): on a synthetic task only the text can solve (every text the same number of
words, the label is which of two marker words it holds, anywhere in it), a model goes from chance to >= 0.9
validation accuracy in a few epochs on DeepSpeed (ZeRO-2), CSV training and JSONL validation files, accuracy and F1
logged every epoch; kill -9 and --resume auto give the same losses, bit for bit; bad inputs are one line,
exit 2."""

import csv
import json
import random
import subprocess
import sys

import pytest
from conftest import ROOT, assert_user_error
from runs import VENV_BIN, env, free_port, run_until_killed, train_records

from dsllm.model import GPT
from dsllm.model_config import ModelConfig
from dsllm.model_dir import save_model_dir

FILLER = "the a of river stone tree small large red green blue old new far near".split()
MARKERS = {"sun": "day", "moon": "night"}
RUN = ("--epochs", 3, "--micro-batch-size", 16, "--lr", "3e-3", "--warmup-steps", 5, "--precision", "fp32",
       "--save-interval", 10, "--log-interval", 1)  # fmt: skip


def examples(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        marker = rng.choice(sorted(MARKERS))
        words = [rng.choice(FILLER) for _ in range(7)]
        words.insert(rng.randrange(8), marker)
        rows.append({"text": " ".join(words), "label": MARKERS[marker]})
    return rows


@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("classify")
    config = ModelConfig(vocab_size=320, max_seq_len=32, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                         positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, mlp_multiple_of=32)  # fmt: skip
    save_model_dir(GPT(config, seed=0), root / "init", tokenizer_dir / "tokenizer.json")
    with open(root / "train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(examples(320, seed=1))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples(80, seed=2)))
    return root


def classify(root, out, *args, ranks=1):
    cmd = ["launch/finetune_classify.py", "--ds_config", "ds_configs/zero2.json", "--init", str(root / "init"),
           "--data", str(root / "train.csv"), "--val-data", str(root / "val.jsonl"), "--out", str(out),
           *map(str, args)]  # fmt: skip
    if ranks > 1:
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *cmd]
    return [sys.executable, *cmd]


@pytest.mark.slow  # ~1 minute on 2 CPU cores: a run, a killed run and its resumption
def test_accuracy_goes_from_chance_to_09_and_a_killed_run_resumes(task, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(classify(task, out, *RUN), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "classify.json").read_text())
    assert summary["labels"] == ["day", "night"] and summary["steps_per_epoch"] == 20
    assert 0.35 <= summary["before"]["accuracy"] <= 0.65, summary["before"]  # the zero head: one label for all
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2, 3]
    assert summary["after"]["accuracy"] >= 0.9 and summary["after"]["f1_macro"] >= 0.9, summary["epochs"]
    assert (out / "classifier.safetensors").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["classifier"]["labels"] == ["day", "night"]

    killed = tmp_path / "killed"
    proc = run_until_killed(classify(task, killed, *RUN), killed, kill_after_step=25)
    assert proc.returncode != 0, "the run finished before it could be killed"
    resumed = subprocess.run(classify(task, killed, *RUN), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    ours, theirs = train_records(killed), train_records(out)
    assert sorted(ours) == list(range(1, 61))
    # bit for bit: resumed at step 20, where DeepSpeed's CPU Adam would start beta^t off by a bit without
    # `replay_cpu_adam_clock` (dsllm/checkpoint/checkpointer.py)
    assert all(ours[s]["loss"] == theirs[s]["loss"] for s in ours), [(s, ours[s], theirs[s]) for s in ours]


@pytest.mark.parametrize(
    "rows, flags, message",
    [
        ("text,kind\na b,day\nc d,night\n", (), "no column 'label' (columns: text, kind); pass --label-column"),
        ("text,label\na b,day\nc d,night\n", ("--labels", "day,noon"), "label 'night' is not one of the labels day"),
        ("text,label\na b,day\n,night\n", (), "no 'text' (fields: text, label); fill it or pass --text-column"),
        ("text,label\na b,day\nc d,day\n", ("--val-fraction", "0"), "one label ('day') only"),
    ],
)
def test_bad_labelled_data_is_one_line_and_exit_2(task, tmp_path, rows, flags, message):
    (tmp_path / "bad.csv").write_text(rows)
    cmd = [sys.executable, "launch/finetune_classify.py", "--ds_config", "ds_configs/zero2.json", "--init",
           str(task / "init"), "--data", str(tmp_path / "bad.csv"), "--val-data", str(task / "val.jsonl"),
           "--out", str(tmp_path / "out"), *flags]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert_user_error(proc, message)
    assert not (tmp_path / "out").exists()
