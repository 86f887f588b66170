"""Sequence parallelism (DeepSpeed-Ulysses) on real ranks (gloo, CPU): each window split in two along its length,
the ranks exchanging heads for sequence around attention. The pieces' logits and summed gradients are the whole
window's (RoPE and learned positions, grouped-query and plain heads); fp32, same global batch and seed: SP=2 on 2
ranks reproduces the single-rank curve and validation loss, the final weights score as the run did, and kill -9 and
--resume auto continue bit for bit, the checkpoint resuming as 2 data-parallel ranks too."""

import json
import subprocess
import sys

import pytest
from conftest import assert_user_error
from runs import (
    LAYOUT_MODELS,
    LAYOUT_RUN,
    ROOT,
    dsllm,
    env,
    free_port,
    killed_then_resumed,
    pretrain,
    same_curve,
    train_records,
)
from test_pipeline import val_losses

SP = [*LAYOUT_RUN, *LAYOUT_MODELS["llama"], "--sequence-parallel", 2]

PIECES = """
import sys
import deepspeed
import torch
from dsllm.model import GPT
from dsllm.model_config import resolve_model_config
from dsllm.run_control import end_process_group
from dsllm.sequence_parallel import SequenceSplit

deepspeed.init_distributed(dist_backend="gloo")
split = SequenceSplit.of(2)
small = {"n_layers": 2, "d_model": 64, "vocab_size": 96, "max_seq_len": 32, "mlp_multiple_of": 32, "dropout": 0.0}
models = {
    "rope, 4 query heads on 2 key/value heads": {"n_heads": 4, "n_kv_heads": 2},
    "learned positions, 2 heads, GELU, biases": {
        "n_heads": 2, "n_kv_heads": 2, "positions": "learned", "mlp": "gelu", "bias": True, "norm": "layernorm"
    },
    "the recipe options: QK-norm, relu2, soft-capped logits, z-loss, value embeddings, U-net skips": {
        "n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "mlp": "relu2", "logit_softcap": 2.0, "z_loss": 0.1,
        "value_embeddings": 1, "unet_skips": True,
    },
}
windows = torch.randint(0, 96, (3, 33), generator=torch.Generator().manual_seed(0))
inputs, targets = windows[:, :-1], windows[:, 1:]
for name, fields in models.items():
    config = resolve_model_config("tiny", {**small, **fields})
    whole, ours = GPT(config, seed=5), GPT(config, seed=5, sequence=split)
    logits, loss = whole(inputs, targets)
    loss.backward()
    piece = split.piece(inputs)
    local_logits, local = ours(piece, split.piece(targets), positions=split.positions(piece))
    total = split.whole_mean(local)
    total.backward()
    torch.testing.assert_close(local_logits, split.piece(logits), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(total, loss, rtol=1e-6, atol=0, msg=name)
    for (param, theirs), mine in zip(whole.named_parameters(), ours.parameters()):
        summed = mine.grad.clone()
        torch.distributed.all_reduce(summed, group=split.group)  # what DeepSpeed does over a sequence group
        torch.testing.assert_close(summed, theirs.grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")
    print("same:", name, flush=True)
end_process_group()  # gloo's threads may otherwise abort the exit (run_control.end_process_group)
"""


@pytest.mark.multirank
def test_pieces_of_a_window_give_the_whole_windows_logits_loss_and_gradients(tmp_path):
    script = tmp_path / "pieces.py"
    script.write_text(PIECES)
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script)],
            cwd=ROOT,
            env={
                **env(),
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in ranks]
    for proc, output in zip(ranks, outputs):
        assert proc.returncode == 0, output
        assert output.count("same:") == 3, output


@pytest.fixture(scope="module")
def sequence(dataset_dir, tmp_path_factory):
    """SP=2 on 2 ranks (ZeRO-1), the Llama-shaped model: 4 query heads on 2 key/value heads, untied head."""
    out = tmp_path_factory.mktemp("sp2") / "run"
    proc = pretrain(dataset_dir, out, *SP, ranks=2, ds="zero1.json")
    return out, proc.stdout


@pytest.mark.multirank
def test_two_sequence_ranks_reproduce_the_single_rank_run(dataset_dir, single, sequence):
    out, stdout = sequence
    assert "on 2 rank(s) (2 sequence-parallel x 1 data-parallel; sequence groups: ranks 0-1), ZeRO-1, fp32" in stdout
    same_curve(out, single["llama"])
    ours, theirs = val_losses(out), val_losses(single["llama"])
    assert sorted(ours) == [10, 20] and all(ours[s] == pytest.approx(theirs[s], rel=1e-5) for s in ours)
    assert json.loads((out / "config.json").read_text())["run"]["sequence_parallel"] == 2
    scored = dsllm("evaluate", "--checkpoint", out, "--data", dataset_dir, "--max-windows", 8, "--seq-len", 32)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["loss"] == pytest.approx(ours[20], rel=1e-5)


@pytest.mark.multirank
@pytest.mark.slow
def test_kill_9_then_resume_continues_exactly_and_as_two_replicas_too(dataset_dir, single, sequence, tmp_path):
    out = tmp_path / "killed"
    killed_then_resumed(dataset_dir, out, *SP, ranks=2, ds="zero1.json")
    uninterrupted, records = train_records(sequence[0]), train_records(out)
    assert sorted(records) == sorted(uninterrupted)
    assert all(records[s]["loss"] == uninterrupted[s]["loss"] for s in records)  # bit for bit
    # the files are those of 2 plain ranks: the checkpoint goes on as 2 data-parallel replicas (micro batch 2 each)
    step12 = out / "checkpoints" / "step00000012"
    other = tmp_path / "two-replicas"
    args = [*LAYOUT_RUN, *LAYOUT_MODELS["llama"], "--micro-batch-size", 2, "--resume", step12]
    moved = pretrain(dataset_dir, other, *args, ranks=2, ds="zero1.json")
    assert "at step 12 " in moved.stdout and "universal" not in moved.stdout
    ours, theirs = train_records(other), train_records(single["llama"])
    assert sorted(ours) == list(range(13, 21))
    assert all(ours[s]["loss"] == pytest.approx(theirs[s]["loss"], rel=1e-5) for s in ours)
    # another world size would go through DeepSpeed's universal checkpoint: refused before training, in one line
    refused = pretrain(dataset_dir, tmp_path / "one-rank", *args, ds="zero1.json", expect=None)
    assert_user_error(refused, "with sequence parallelism a checkpoint resumes on the same number of ranks")
