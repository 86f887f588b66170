"""Preference alignment (issue 17), on DeepSpeed (ZeRO-2): on a synthetic preference set (the chosen response says
"sun" where the rejected one, otherwise the same words, says "moon"), DPO's preference accuracy on held-out pairs goes
from 0.5 (the policy is its reference: every margin 0) to >= 0.9 and the implicit reward margin grows; a reward model
goes from 0.5 (its zero head) to >= 0.9 likewise; on 2 ranks the reference log-probabilities are shared out, kept in
the run folder and read back by a run killed and resumed, which follows the single rank's curve; bad pairs are one
line, exit 2."""

import json
import random
import subprocess
import sys

import pytest
from conftest import ROOT, assert_user_error
from runs import VENV_BIN, env, free_port, run_until_killed, train_records

from dsllm.model import GPT
from dsllm.model_config import ModelConfig
from dsllm.model_dir import load_model_dir, save_model_dir

FILLER = "the a of river stone tree small large red green blue old new far near".split()
RUN = ("--epochs", 3, "--micro-batch-size", 8, "--warmup-steps", 3, "--precision", "fp32", "--log-interval", 5)


def pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(FILLER) for _ in range(4)]
        at = rng.randrange(5)
        chosen, rejected = words[:at] + ["sun"] + words[at:], words[:at] + ["moon"] + words[at:]
        out.append({"prompt": f"say {rng.choice(FILLER)}", "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("preference")
    config = ModelConfig(vocab_size=320, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                         positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, mlp_multiple_of=32,
                         tie_embeddings=False)  # fmt: skip
    save_model_dir(GPT(config, seed=0), root / "init", tokenizer_dir / "tokenizer.json")
    (root / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(192, seed=1)))
    (root / "val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs(48, seed=2)))
    return root


DPO = ("--lr", "2e-3", "--beta", "0.5")


def command(script: str, root, out, *args, ranks: int = 1) -> list[str]:
    cmd = [f"launch/{script}.py", "--ds_config", "ds_configs/zero2.json", "--init", str(root / "init"),
           "--data", str(root / "train.jsonl"), "--val-data", str(root / "val.jsonl"), "--out", str(out),
           *map(str, args)]  # fmt: skip
    if ranks > 1:
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *cmd]
    return [sys.executable, *cmd]


def run(script: str, root, out, *args, ranks: int = 1):
    cmd = command(script, root, out, *args, ranks=ranks)
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dpo(task, tmp_path_factory):
    """The DPO run on one rank (micro batches of 8 pairs): (run folder, its stdout)."""
    out = tmp_path_factory.mktemp("dpo") / "run"
    proc = run("dpo", task, out, *RUN, *DPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow  # ~20 s on 2 CPU cores
def test_dpo_lifts_held_out_preference_accuracy_from_05_to_09(dpo, tmp_path):
    out, stdout = dpo
    assert f"reference: log-probabilities of 480 responses computed on 1 rank(s) into {out}" in stdout
    summary = json.loads((out / "dpo.json").read_text())
    assert summary["before"]["accuracy"] == 0.5 and summary["before"]["margin"] == 0.0  # the policy is the reference
    margins = [e["margin"] for e in summary["epochs"]]
    assert summary["after"]["accuracy"] >= 0.9 and margins == sorted(margins) and margins[-1] > 1.0, summary["epochs"]
    policy = load_model_dir(out)  # a model folder generate, evaluate and export take
    assert json.loads((out / "config.json").read_text())["dpo"] == {"beta": 0.5}
    assert policy.config.d_model == 64


@pytest.mark.multirank
@pytest.mark.slow  # ~70 s on 2 CPU cores: a 2-rank run killed, and its resumption
def test_two_ranks_share_the_reference_and_a_resumed_run_reads_it_back(task, dpo, tmp_path):
    out, args = tmp_path / "dpo2", (*RUN, *DPO, "--micro-batch-size", 4, "--save-interval", 10)
    proc = run_until_killed(command("dpo", task, out, *args, ranks=2), out, kill_after_step=25)
    assert proc.returncode != 0, "the run finished before it could be killed"
    resumed = run("dpo", task, out, *args, ranks=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and f"responses read back from {out}" in resumed.stdout
    ours, theirs = train_records(out), train_records(dpo[0])
    assert sorted(ours) == sorted(theirs) == [*range(5, 73, 5), 72]  # (--log-interval 5: a mean of 5 steps)
    assert all(ours[s]["loss"] == pytest.approx(theirs[s]["loss"], rel=1e-4) for s in theirs)  # 2 x 4 pairs = 8
    after = [json.loads((run_dir / "dpo.json").read_text())["after"] for run_dir in (out, dpo[0])]
    assert after[0]["accuracy"] == after[1]["accuracy"] and after[0]["margin"] == pytest.approx(
        after[1]["margin"], rel=1e-4
    )


@pytest.mark.slow  # ~20 s on 2 CPU cores
def test_reward_model_ranks_held_out_pairs_from_05_to_09(task, tmp_path):
    proc = run("reward_model", task, tmp_path / "reward", *RUN, "--lr", "2e-3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "reward" / "reward.json").read_text())
    assert summary["before"]["accuracy"] == 0.5  # the zero head: every reward 0
    assert summary["after"]["accuracy"] >= 0.9 and summary["after"]["margin"] > 0, summary["epochs"]
    assert (tmp_path / "reward" / "reward_head.safetensors").is_file()


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "p", "chosen": "a"}, "'rejected' is missing"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same text"),
        (["p", "a", "b"], "a JSON list, not an object"),
    ],
)
def test_bad_pairs_are_one_line_and_exit_2(task, tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps(pairs(1, 0)[0]) + "\n" + json.dumps(line) + "\n")
    cmd = [sys.executable, "launch/dpo.py", "--ds_config", "ds_configs/zero2.json", "--init", str(task / "init"),
           "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert_user_error(proc, f"bad.jsonl:2: {message}" if "JSON list" not in message else message)
    assert not (tmp_path / "out").exists()
