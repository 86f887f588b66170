"""--optimizer muon and lion: DeepSpeed's Muon (Muon on the blocks' matrices, AdamW on the rest) and Lion, in real
engines: which parameters Muon gets, the schedule on every group, the loss going down, and exact resume after
kill -9 on one rank and on two (ZeRO-2: each rank holds its partition of Muon's momentum)."""

import json
import os

import pytest
from conftest import ROOT
from runs import SMALL_MODEL, command, pretrain, run_until_killed, script_result, train_records

SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from dsllm.engine import build_engine, engine_options, init_distributed, window_loss
from dsllm.model import GPT
from dsllm.pretrain import make_loader, preflight
from dsllm.train_config import TrainConfig

ds, data, out, *model = sys.argv[1:]
overrides = {k.removeprefix("--model."): v for k, v in zip(model[2::2], model[3::2])}
overrides.update(tie_embeddings="false")  # an LM head of its own: AdamW's, like the embeddings
config = TrainConfig(ds_config=ds, data=data, out=out, model="tiny", model_overrides=overrides, seq_len=32,
                     micro_batch_size=4, max_steps=20, warmup_steps=4, resume="none", loader_workers=0,
                     precision="fp32", optimizer="muon", lr=3e-3, muon_lr=0.02)
plan = preflight(config)
device = init_distributed(plan.spec.world, config.collective_timeout)
torch.manual_seed(config.seed)
gpt = GPT(plan.spec.model)
names = {id(p): n for n, p in gpt.named_parameters()}
options = engine_options(config)
engine = build_engine(plan.spec, gpt, device, window_loss, **options)
optimizer = engine.ds.basic_optimizer
batches = iter(make_loader(plan, device))
losses, lrs = [], []
for step in range(20):
    losses.append(float(engine.train_batch(batches)[0]))
    lrs.append([(g["lr"], g["initial_lr"], options["schedule"](step + 1)) for g in optimizer.param_groups])
groups = [{"muon": g["use_muon"], "names": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
print("RESULT " + json.dumps({"groups": groups, "losses": losses, "lrs": lrs, "type": type(optimizer).__name__}))
engine.ds.destroy()
dist.destroy_process_group()
"""


def no_optimizer_json(tmp_path, stage: int, scheduler: bool = True):
    """ds_configs/zeroN.json without its optimizer section (--optimizer fills it), and without its scheduler."""
    config = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    del config["optimizer"]
    if not scheduler:
        del config["scheduler"]
    path = tmp_path / f"zero{stage}-{'schedule' if scheduler else 'lambda'}.json"
    path.write_text(json.dumps(config))
    return path


def test_muon_updates_the_block_matrices_on_the_schedule_and_trains(tmp_path, dataset_dir):
    ds = no_optimizer_json(tmp_path, 0, scheduler=False)  # ZeRO-0: the optimizer holds the parameters themselves
    speedrun = ["--model.value_embeddings", "1", "--model.unet_skips", "true"]  # a table, 1-element weights: AdamW's
    result = script_result(  # Muon's Newton-Schulz eager: its compile is ~9 s per process
        SCRIPT, ds, dataset_dir, tmp_path / "run", *SMALL_MODEL, *speedrun, extra_env={"TORCHDYNAMO_DISABLE": "1"}
    )
    assert result["type"] == "MuonWithAuxAdam"
    muon = sorted(n for g in result["groups"] if g["muon"] for n in g["names"])
    adam = sorted(n for g in result["groups"] if not g["muon"] for n in g["names"])
    blocks = [f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert muon == sorted(blocks)
    speedrun_weights = {"value_embeddings.0.weight", "skip_weights", "blocks.0.attn.value_scale"}
    assert {"tok_embeddings.weight", "lm_head.weight", "norm.weight", *speedrun_weights} <= set(adam)
    assert all(
        n.endswith((".bias", ".value_scale"))
        or "norm" in n
        or n.split(".")[0] in ("tok_embeddings", "pos_embeddings", "lm_head", "value_embeddings", "skip_weights")
        for n in adam
    )
    base = sorted({initial for step in result["lrs"] for _, initial, _ in step})
    assert base == [3e-3, 0.02]  # --lr for AdamW's groups, --muon-lr for Muon's
    for step in result["lrs"]:  # the schedule scales every group: lr = its base x the step's factor
        for lr, initial, factor in step:
            assert lr == pytest.approx(initial * factor, rel=1e-12)
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def killed_and_resumed(data, out, args, ranks, ds):
    """A run killed (-9) after step 10 and resumed from its step-8 checkpoint: (records before the kill, records
    of the resumed run). The steps from 9 to the kill were trained twice: after the same checkpoint, the same
    losses and learning rates."""
    proc = run_until_killed(command(data, out, *args, ranks=ranks, ds=ds), out, kill_after_step=10)
    assert proc.returncode != 0, "the run finished before it could be killed"
    before = train_records(out)
    resumed = pretrain(data, out, *args, ranks=ranks, ds=ds)
    assert "resumed from" in resumed.stdout and "at step 8 " in resumed.stdout, resumed.stdout[-2000:]
    return before, train_records(out)


RESUME_RUN = ["--max-steps", 16, "--micro-batch-size", 4, "--save-interval", 8, "--eval-interval", 100]
RESUME_RUN += ["--precision", "fp32", "--grad-clip", 0]


@pytest.mark.parametrize(
    "optimizer, ranks, stage",
    [
        ("muon", 1, 1),
        pytest.param("muon", 2, 2, marks=[pytest.mark.multirank, pytest.mark.slow]),
        ("lion", 1, 1),
    ],
)
def test_kill_then_resume_is_exact(tmp_path, dataset_dir, monkeypatch, optimizer, ranks, stage):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # Muon's Newton-Schulz eager: its compile is ~9 s per process
    ds = no_optimizer_json(tmp_path, stage)
    args = [*RESUME_RUN, "--optimizer", optimizer, *(("--lr", 3e-4, "--beta2", 0.99) if optimizer == "lion" else ())]
    args += ["--schedule", "wsd"] if optimizer == "muon" else []  # warmup-stable-decay's exact resume: 1 and 2 ranks
    ds_arg = os.path.relpath(ds, ROOT / "ds_configs")
    before, after = killed_and_resumed(dataset_dir, tmp_path / "run", args, ranks, ds_arg)
    killed_at = max(before)
    assert 10 <= killed_at < 16 and sorted(after) == list(range(1, 17))
    for step in range(9, killed_at + 1):  # at least two steps: the second one after an update from restored state
        assert after[step]["loss"] == before[step]["loss"], step
        assert after[step]["lr"] == before[step]["lr"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["deepspeed"]["optimizer"]["type"] == {"muon": "Muon", "lion": "Lion"}[optimizer]
    assert after[16]["loss"] < after[1]["loss"]
    if optimizer == "lion":  # its checkpoint under another optimizer: one line before any rank starts
        other = pretrain(dataset_dir, tmp_path / "run", *RESUME_RUN, "--max-steps", 20, ds=ds_arg, expect=2)
        assert "trained with --optimizer lion, this run has adamw" in other.stderr
