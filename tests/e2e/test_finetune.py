"""launch/finetune.py: supervised fine-tuning of a pretrained run under the DeepSpeed launcher. Packing keeps
attention inside each example, the loss counts reply tokens only, and a task the pretrained model cannot do
(reversing short strings) goes from no exact matches to most of them."""

import dataclasses
import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_user_error
from runs import VENV_BIN, env, free_port, pretrain, run_until_killed, train_records


def reversal_task(path, count, seed=0):
    rng, seen = random.Random(seed), set()
    with open(path, "w") as f:
        while len(seen) < count:
            letters = " ".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 5)))
            if letters not in seen:
                seen.add(letters)
                f.write(
                    json.dumps({"prompt": "reverse: " + letters, "response": " ".join(letters.split()[::-1])}) + "\n"
                )
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A briefly pretrained small model on the embedded corpus, whose 1000-token vocabulary keeps " a" … " h" one
    token each (the tests' 300-token one is nearly character-level, and reversal then needs far more steps)."""
    from dsllm.data.default_corpus import build_default_dataset

    data = build_default_dataset(max_bytes=300_000, vocab_size=1000, log=lambda message: None)
    out = tmp_path_factory.mktemp("sft") / "base"
    pretrain(
        data, out, "--max-steps", 20, "--seq-len", 64, "--precision", "fp32", "--sample-tokens", 0, ds="zero0.json"
    )
    return out


def finetune_command(init, data, out, *args, ranks=1, ds="zero2.json"):
    script = [
        "launch/finetune.py",
        "--ds_config",
        f"ds_configs/{ds}",
        "--init",
        str(init),
        "--data",
        str(data),
        "--out",
        str(out),
        "--precision",
        "fp32",
        *map(str, args),
    ]
    return (
        [sys.executable, *script]
        if ranks == 1
        else [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *script]
    )


def finetune(init, data, out, *args, ranks=1, ds="zero2.json", expect=0):
    cmd = finetune_command(init, data, out, *args, ranks=ranks, ds=ds)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_reversal_is_learned_only_by_fine_tuning(tmp_path, pretrained):
    data = reversal_task(tmp_path / "reverse.jsonl", 2000)
    out = tmp_path / "sft"
    proc = finetune(
        pretrained,
        data,
        out,
        "--max-steps",
        1000,
        "--lr",
        "5e-3",
        "--warmup-steps",
        30,
        "--micro-batch-size",
        32,
        "--log-interval",
        100,
        "--eval-examples",
        100,
        "--seed",
        7,
    )
    summary = json.loads((out / "finetune.json").read_text())
    # measured (2026-11-30, this base, whose weights start from per-parameter seeded values since then): 0.00
    # before. Learning comes as a phase change whose step varies by seed and by machine: at lr 1e-2, 1.00 on seed 7
    # on one machine and 0.56 on another (another CPU: other float rounding); at lr 5e-3, 1.00 on seeds 7, 1234 and
    # 11 on the second machine (val loss 1e-8 to 3e-5).
    assert summary["before"]["exact_match"] <= 0.05 and summary["after"]["exact_match"] >= 0.8, summary
    assert summary["after"]["val_loss"] < summary["before"]["val_loss"] / 4
    assert summary["train_examples"] == 1900 and summary["val_examples"] == 100 and summary["truncated"] == 0
    assert "before: val loss" in proc.stdout and "after: val loss" in proc.stdout
    # the result is a model folder the other commands take; generate --chat wraps prompts in the same template
    answer = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsllm",
            "generate",
            "--checkpoint",
            str(out),
            "--chat",
            "--prompt",
            "reverse: a b c d",
            "--temperature",
            "0",
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout == "user: reverse: a b c d\nassistant: d c b a\n"


@pytest.mark.multirank
def test_two_ranks_zero3_from_a_pretrained_run(tmp_path, pretrained):
    data = reversal_task(tmp_path / "reverse.jsonl", 200)
    out = tmp_path / "sft"
    proc = finetune(
        pretrained,
        data,
        out,
        "--max-steps",
        20,
        "--lr",
        "3e-3",
        "--micro-batch-size",
        4,
        "--log-interval",
        10,
        "--eval-examples",
        4,
        ranks=2,
        ds="zero3.json",
    )
    assert "2 rank(s), ZeRO-3" in proc.stdout and proc.stdout.count("fine-tuned model:") == 1
    losses = [record["loss"] for _, record in sorted(train_records(out).items())]
    assert len(losses) == 2 and losses[1] < losses[0]
    from dsllm.model_dir import load_model_dir

    before, after = load_model_dir(pretrained), load_model_dir(out)  # ZeRO-3 partitions, consolidated to fp32
    assert set(before.state_dict()) == set(after.state_dict())
    assert not torch.equal(before.tok_embeddings.weight, after.tok_embeddings.weight)


def test_packing_keeps_attention_inside_each_example(pretrained):
    from dsllm.model import GPT
    from dsllm.model_dir import load_model_dir
    from dsllm.sft_data import pack, tokenize
    from dsllm.tokenizer import eot_id, load_tokenizer

    base, tokenizer = load_model_dir(pretrained), load_tokenizer(pretrained / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(base.config, max_seq_len=128)).eval()
    eot = eot_id(tokenizer)
    conversations = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [
            {"role": "system", "content": "x"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "dsllm"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "no"},
        ],
    ]
    examples = [tokenize(m, tokenizer, eot) for m in conversations]
    assert sum(len(ids) - 1 for ids, _ in examples) <= 120
    packed = pack(examples, 128)
    assert len(packed.idx) == 1  # both fit one row
    batch = packed.batch([0])
    with torch.no_grad():
        logits, _ = model(batch["idx"], positions=batch["positions"], mask=batch["mask"])
        start = 0
        for ids, trained in examples:
            alone, _ = model(torch.tensor([ids[:-1]]))
            torch.testing.assert_close(logits[0, start : start + len(ids) - 1], alone[0], rtol=1e-4, atol=1e-4)
            expected = [t if keep else -100 for t, keep in zip(ids[1:], trained[1:])]  # replies (and their EOT)
            assert batch["targets"][0, start : start + len(ids) - 1].tolist() == expected
            start += len(ids) - 1
        assert (batch["targets"][0, start:] == -100).all() and (packed.segments[0, start:] == -1).all()
    reply = tokenizer.decode([t for t in batch["targets"][0].tolist() if t not in (-100, eot)])
    assert reply == "hellodsllmno"  # only assistant text is trained


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', "reverse.jsonl:2: malformed JSON"),
        ('{"prompt": "a", "answer": "b"}\n', 'reverse.jsonl:1: expected {"prompt": str, "response": str}'),
        ('{"messages": [{"role": "user", "content": "a"}]}\n', "reverse.jsonl:1: no assistant message"),
        ('{"messages": [{"role": "robot", "content": "a"}]}\n', 'reverse.jsonl:1: "messages" must be a list'),
    ],
)
def test_bad_data_is_one_line(tmp_path, pretrained, content, message):
    (tmp_path / "reverse.jsonl").write_text(content)
    proc = finetune(pretrained, tmp_path / "reverse.jsonl", tmp_path / "out", expect=2)
    assert_user_error(proc, message)
    assert not (tmp_path / "out").exists()  # nothing written before the input is known good


@pytest.mark.multirank
def test_missing_pretrained_run_is_one_line(tmp_path):
    data = reversal_task(tmp_path / "reverse.jsonl", 10)
    proc = finetune(tmp_path / "nothing", data, tmp_path / "out", ranks=2, expect=2)
    assert "no model here" in proc.stderr and proc.stderr.count("error:") == 1  # once, not once per rank


@pytest.fixture
def model_folder(tmp_path, tokenizer_dir):
    """A small random model folder with the tests' tokenizer: what --init takes, no pretraining needed."""
    from dsllm.model import GPT
    from dsllm.model_config import ModelConfig
    from dsllm.model_dir import save_model_dir

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, max_seq_len=64, n_layers=1, d_model=32, n_heads=2, mlp_multiple_of=32))
    return save_model_dir(model, tmp_path / "base", tokenizer_dir / "tokenizer.json")


def test_out_over_the_pretrained_run_or_the_data_is_refused(tmp_path, model_folder):
    """`--out RUN --init RUN` overwrote the pretrained config, then crashed."""
    (tmp_path / "data").mkdir()
    data = reversal_task(tmp_path / "data" / "reverse.jsonl", 10)
    (tmp_path / "link").symlink_to(model_folder)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, fragments in (
        (model_folder, ("contains", "config.json, which --init reads")),
        (tmp_path / "link", ("contains", "(symlinks resolved), which --init reads")),
        (tmp_path / "data", ("contains", "reverse.jsonl, which --data reads")),
        (model_folder / "model.safetensors" / "x", ("lies inside", "which --init reads")),
    ):
        proc = finetune(model_folder, data, out, expect=2)
        assert_user_error(proc, f"--out {out} ", *fragments, "choose another --out")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_literal_endoftext_in_an_example_is_text(model_folder):
    """Only the template puts <|endoftext|> between examples; written in a prompt or reply it is text, as in prepare."""
    from dsllm.sft_data import tokenize
    from dsllm.tokenizer import eot_id, load_tokenizer

    tokenizer = load_tokenizer(model_folder)
    eot = eot_id(tokenizer)
    messages = [
        {"role": "user", "content": "split <|endoftext|> here?"},
        {"role": "assistant", "content": "no<|endoftext|>never"},
    ]
    ids, trained = tokenize(messages, tokenizer, eot)
    assert [i for i, token in enumerate(ids) if token == eot] == [0, len(ids) - 1]  # the template's two only
    assert tokenizer.decode(ids[1:], skip_special_tokens=False) == (
        "<|user|>\nsplit <|endoftext|> here?\n<|assistant|>\nno<|endoftext|>never<|endoftext|>"
    )
    reply = [token for token, keep in zip(ids, trained) if keep]
    assert tokenizer.decode(reply, skip_special_tokens=False) == "no<|endoftext|>never<|endoftext|>"
    assert tokenizer.encode_special_tokens is False  # the caller's tokenizer is left as it was


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=[pytest.mark.multirank, pytest.mark.slow])])
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path, pretrained, ranks):
    """Fine-tuning runs on the pretraining loop: kill -9 mid-run, and --resume auto (the default) continues
    from the last checkpoint with the very losses, learning rates, rows and final weights of a run never
    killed (CPU fp32, 1 and 2 ranks)."""
    from safetensors.torch import load_file

    data = reversal_task(tmp_path / "reverse.jsonl", 60)
    args = ["--max-steps", 10, "--micro-batch-size", 2, "--save-interval", 3, "--eval-interval", 5]
    args += ["--log-interval", 1, "--eval-examples", 0, "--seq-len", 48]
    finetune(pretrained, data, tmp_path / "whole", *args, ranks=ranks)
    reference = train_records(tmp_path / "whole")
    out = tmp_path / "killed"
    proc = run_until_killed(finetune_command(pretrained, data, out, *args, ranks=ranks), out, kill_after_step=5)
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert 5 <= max(train_records(out)) < 10 and not (out / "finetune.json").exists()
    resumed_proc = finetune(pretrained, data, out, *args, ranks=ranks)
    assert "resumed from" in resumed_proc.stdout and (
        "at step 3" in resumed_proc.stdout or "at step 6" in resumed_proc.stdout
    )
    assert "before:" not in resumed_proc.stdout  # the pretrained model's score is the first attempt's
    resumed = train_records(out)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step]["loss"] == reference[step]["loss"], step
        assert resumed[step]["lr"] == reference[step]["lr"] and resumed[step]["samples"] == reference[step]["samples"]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    reference_evals = [
        json.loads(line)
        for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]
    assert evals[-1]["step"] == 10 and evals[-1]["val_loss"] == pytest.approx(reference_evals[-1]["val_loss"], rel=1e-6)
    final, whole = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all(torch.equal(final[name], whole[name]) for name in whole)


def test_fine_tuning_has_the_pretraining_loops_guards(tmp_path, pretrained):
    """Periodic checkpoints and evaluation, a second run on the same --out continuing instead of starting over,
    and --resume none refusing a run that already has checkpoints."""
    data = reversal_task(tmp_path / "reverse.jsonl", 40)
    out = tmp_path / "sft"
    args = ["--max-steps", 4, "--micro-batch-size", 2, "--save-interval", 2, "--eval-interval", 2]
    args += ["--log-interval", 2, "--eval-examples", 0, "--seq-len", 48, "--keep-checkpoints", 5]
    proc = finetune(pretrained, data, out, *args)
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000002", "step00000004"]
    marker = json.loads((out / "checkpoints" / "step00000004" / "dsllm_complete.json").read_text())
    assert marker["kind"] == "finetune" and marker["step"] == 4 and marker["val_loss"] is not None
    assert [
        r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r
    ] == [2, 4]
    assert "tok/s" in proc.stdout and "ETA" in proc.stdout
    again = finetune(pretrained, data, out, *args[2:], "--max-steps", 6)
    assert "resumed from" in again.stdout and "at step 4" in again.stdout
    refused = finetune(pretrained, data, out, *args, "--resume", "none", expect=2)
    assert_user_error(refused, "already has checkpoints; pass --resume auto")
