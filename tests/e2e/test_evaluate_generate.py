"""`python -m dsllm evaluate` and `generate` on a real run (ZeRO-2, 2 ranks, fp32): evaluate reproduces the
trainer's validation numbers from the sharded checkpoint and from the consolidated weights; generate is
the model's own `generate`, streamed; bad input is one line and exit 2."""

import io
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_user_error
from runs import env, pretrain

STEPS = 40


@pytest.fixture(scope="module")  # a 2-rank run: the tests that use it are marked multirank
def run_dir(tmp_path_factory, dataset_dir):
    out = tmp_path_factory.mktemp("evaluate") / "run"
    pretrain(
        dataset_dir,
        out,
        "--max-steps",
        STEPS,
        "--micro-batch-size",
        4,
        "--precision",
        "fp32",
        "--eval-interval",
        STEPS,
        "--save-interval",
        STEPS,
        ranks=2,
    )
    return out


@pytest.fixture(scope="module")
def model_and_tokenizer(run_dir):
    from dsllm.model_dir import load_model_dir
    from dsllm.tokenizer import load_tokenizer

    return load_model_dir(run_dir).eval(), load_tokenizer(run_dir / "tokenizer.json")


def dsllm(*args, expect=0):
    proc = subprocess.run(
        [sys.executable, "-m", "dsllm", *map(str, args)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def evaluate(*args, stderr: list | None = None) -> dict:
    proc = dsllm("evaluate", *args)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # one JSON object, nothing else on stdout
    if stderr is not None:
        stderr += proc.stderr.splitlines()
    return json.loads(lines[0])


def final_eval(run_dir) -> dict:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]


# -- evaluate --------------------------------------------------------------------------------------------
@pytest.mark.multirank
def test_evaluate_reproduces_the_trainers_validation(run_dir, dataset_dir):
    trainer = final_eval(run_dir)
    assert trainer["step"] == STEPS
    said = []
    result = evaluate("--checkpoint", run_dir, "--data", dataset_dir, "--max-windows", 8, stderr=said)  # trainer's
    # progress goes to stderr: what it will score, before it starts (the bar itself only on a terminal)
    assert said == [
        f"evaluating 8 of {result['windows_in_split']} windows (32 tokens each) of the val split in batches of 8 on cpu"
    ]
    assert result["seq_len"] == 32  # the run's --seq-len, from its config.json
    assert result["windows"] == 8 and result["tokens"] == 8 * 32 == trainer["tokens"]
    assert result["loss"] == pytest.approx(trainer["val_loss"], abs=1e-4)
    assert result["bits_per_byte"] == pytest.approx(trainer["bits_per_byte"], rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["split"] == "val" and result["checkpoint"].endswith("model.safetensors")


@pytest.mark.multirank
def test_sharded_checkpoint_consolidated_and_model_folder_agree(run_dir, dataset_dir, tmp_path):
    """The ZeRO-2 checkpoint of 2 ranks, loaded on one process, is the run's consolidated weights."""
    tag = run_dir / "checkpoints" / f"step{STEPS:08d}"
    dsllm("consolidate", "--checkpoint", tag, "--output", tmp_path / "model")
    args = ["--data", dataset_dir, "--batch-size", 3, "--seq-len", 32]  # every window of the split
    results = [evaluate("--checkpoint", source, *args) for source in (tag, run_dir, tmp_path / "model")]
    assert results[0]["checkpoint"] == str(tag)
    numbers = [{k: r[k] for k in ("loss", "perplexity", "bits_per_byte", "tokens", "windows")} for r in results]
    assert numbers[0] == numbers[1] == numbers[2]
    assert numbers[0]["windows"] == results[0]["windows_in_split"] > 8
    # a model folder does not know the run's seq_len: its windows are model.max_seq_len long unless told
    assert evaluate("--checkpoint", tmp_path / "model", "--data", dataset_dir, "--max-windows", 2)["seq_len"] == 64
    train = evaluate(
        "--checkpoint", run_dir, "--data", dataset_dir, "--split", "train", "--max-windows", 4, "--seq-len", 64
    )
    assert train["split"] == "train" and train["tokens"] == 4 * 64


@pytest.mark.multirank
def test_choice_scores_are_the_models_log_likelihoods(run_dir, model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    eot = tokenizer.token_to_id("<|endoftext|>")
    examples = [
        {"context": "doc 7: the model reads", "choices": [" tokens from memory", " qzx vjk wpf yyq"], "label": 0},
        {"context": "doc 12: every rank keeps its own", "choices": [" xq zzv kj", " slice of the state"], "label": 1},
        {
            "context": "doc 3: the optimizer steps",
            "choices": [" through shards of data", " jjj qqq xxx zzz"],
            "label": 0,
        },
        {"context": "doc 40: until the checkpoint lands on", "choices": [" vvq zkx", " disk"], "label": 1},
    ]
    (tmp_path / "choices.jsonl").write_text("".join(json.dumps(e) + "\n\n" for e in examples))
    said = []
    result = evaluate("--checkpoint", run_dir, "--choices", tmp_path / "choices.jsonl", stderr=said)
    assert "loss" not in result and result["choice_examples"] == 4
    assert said == [f"scoring 4 multiple-choice examples (8 choices) from {tmp_path / 'choices.jsonl'} on cpu"]
    assert result["choice_accuracy"] == 1.0 and result["choice_accuracy_norm"] == 1.0  # words it saw vs. gibberish

    # by hand for the first example: the sum of log p(choice token | everything before it)
    from dsllm.evaluation import choice_log_likelihoods

    context = [eot] + tokenizer.encode(examples[0]["context"]).ids
    scores = []
    for choice in examples[0]["choices"]:
        ids = context + tokenizer.encode(choice).ids
        with torch.no_grad():
            log_probs = model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)
        scores.append(sum(log_probs[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
    ours = choice_log_likelihoods(model, context, [tokenizer.encode(c).ids for c in examples[0]["choices"]], "cpu")
    assert ours == pytest.approx(scores, abs=1e-4) and scores[0] > scores[1]


@pytest.mark.multirank
def test_evaluate_refuses_bad_input(run_dir, dataset_dir, tmp_path, corpus_jsonl, corpus_texts):
    from dsllm.data.prepare import PrepareConfig, prepare
    from dsllm.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(corpus_texts[:200], vocab_size=280, show_progress=False), tmp_path / "tok")
    prepare(
        PrepareConfig(
            inputs=[str(corpus_jsonl)],
            tokenizer=str(tmp_path / "tok"),
            output=str(tmp_path / "other"),
            val_fraction=0.1,
            workers=1,
            progress=False,
        )
    )
    proc = dsllm("evaluate", "--checkpoint", run_dir, "--data", tmp_path / "other", expect=None)
    assert_user_error(proc, "made with another tokenizer", str(run_dir / "tokenizer.json"), "--tokenizer")

    assert_user_error(
        dsllm("evaluate", "--checkpoint", tmp_path / "missing", "--data", dataset_dir, expect=None),
        "missing: no model here",
    )
    (tmp_path / "no_weights").mkdir()  # a run killed before its first checkpoint
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(run_dir / name, tmp_path / "no_weights" / name)
    assert_user_error(
        dsllm("evaluate", "--checkpoint", tmp_path / "no_weights", "--data", dataset_dir, expect=None),
        "no_weights: no model here",
        "checkpoints",
    )
    assert_user_error(
        dsllm("evaluate", "--checkpoint", run_dir, "--data", dataset_dir, "--split", "test", expect=None),
        "no test split",
    )
    assert_user_error(
        dsllm("evaluate", "--checkpoint", run_dir, "--data", dataset_dir, "--seq-len", 65, expect=None),
        "longer than model.max_seq_len = 64",
    )
    assert_user_error(
        dsllm("evaluate", "--checkpoint", run_dir, "--data", dataset_dir, "--max-windows", 0, expect=None),
        "--max-windows",
        "must be 1 or more",
    )
    assert_user_error(dsllm("evaluate", "--checkpoint", run_dir, expect=None), "pass --data DIR, --choices")

    good = json.dumps({"context": "doc 1:", "choices": [" the", " model"], "label": 0})
    for lines, fragment in [
        ([good, '{"context": "doc 1:", "choices": [" a", " b"], "label": 0'], "malformed JSON"),
        ([good, json.dumps({"context": "x", "choices": [" a"], "label": 0})], "at least two"),
        ([good, json.dumps({"context": "x", "choices": [" a", " b"], "label": 2})], "'label' is 2"),
        ([good, json.dumps(["x", [" a", " b"], 0])], "not an object"),
    ]:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(lines) + "\n")
        assert_user_error(
            dsllm("evaluate", "--checkpoint", run_dir, "--choices", path, expect=None), f"{path}:2:", fragment
        )


@pytest.mark.multirank
def test_weights_of_another_model_or_damaged_files_are_refused(run_dir, dataset_dir, tmp_path):
    other = tmp_path / "other"  # a model folder whose config says d_model 128 over weights of d_model 64
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((other / "config.json").read_text())
    config["model"]["d_model"] = 2 * config["model"]["d_model"]
    (other / "config.json").write_text(json.dumps(config))
    assert_user_error(
        dsllm("evaluate", "--checkpoint", other, "--data", dataset_dir, expect=None),
        "cannot load these weights",
        "size mismatch",
        "another model",
    )
    damaged = tmp_path / "damaged"  # no final weights, and the newest checkpoint's optimizer shards cut short
    shutil.copytree(run_dir, damaged)
    (damaged / "model.safetensors").unlink()
    shards = list((damaged / "checkpoints").rglob("*optim_states.pt"))
    assert shards
    for shard in shards:
        shard.write_bytes(shard.read_bytes()[:1000])
    assert_user_error(
        dsllm("generate", "--checkpoint", damaged, "--prompt", "doc", expect=None),
        "cannot load these weights",
        "damaged",
    )


# -- generate --------------------------------------------------------------------------------------------
def model_greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    eot = tokenizer.token_to_id("<|endoftext|>")
    ids = model.generate(
        [[eot] + tokenizer.encode(prompt).ids],
        new_tokens,
        temperature=0,
        eos_id=eot,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
    )[0]
    return prompt + tokenizer.decode(ids) + "\n"


@pytest.mark.multirank
def test_greedy_generation_is_the_models_own(run_dir, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected = model_greedy(model, tokenizer, "doc 5: the", 20)
    greedy = dsllm(
        "generate", "--checkpoint", run_dir, "--prompt", "doc 5: the", "--max-new-tokens", 20, "--temperature", 0
    ).stdout
    assert greedy == expected and len(expected) > len("doc 5: the\n") + 10
    top_k_1 = dsllm(
        "generate",
        "--checkpoint",
        run_dir,
        "--prompt",
        "doc 5: the",
        "--max-new-tokens",
        20,
        "--temperature",
        1.5,
        "--top-k",
        1,
        "--seed",
        4,
    ).stdout
    assert top_k_1 == expected


@pytest.mark.multirank
def test_seeds_reproduce_and_prompts_run_in_turn(run_dir, tmp_path):
    def sample(*prompts, seed=7):
        args = [a for p in prompts for a in ("--prompt", p)]
        return dsllm(
            "generate",
            "--checkpoint",
            run_dir,
            *args,
            "--max-new-tokens",
            24,
            "--temperature",
            1.5,
            "--top-p",
            0.95,
            "--seed",
            seed,
        )

    first = sample("doc 9:")
    assert not first.stderr.strip()  # the seed was given, so nothing to report
    assert sample("doc 9:").stdout == first.stdout != sample("doc 9:", seed=8).stdout
    both = sample("doc 9:", "the model").stdout
    second = sample("the model").stdout
    assert both == f"=== prompt 1/2 ===\n{first.stdout}\n=== prompt 2/2 ===\n{second}"
    # --prompt-file: one prompt a line, or a JSONL of strings / {"prompt": ...}
    (tmp_path / "prompts.txt").write_text("doc 9:\n\nthe model\n")
    (tmp_path / "prompts.jsonl").write_text('"doc 9:"\n{"prompt": "the model"}\n')
    for file in ("prompts.txt", "prompts.jsonl"):
        proc = dsllm(
            "generate",
            "--checkpoint",
            run_dir,
            "--prompt-file",
            tmp_path / file,
            "--max-new-tokens",
            24,
            "--temperature",
            1.5,
            "--top-p",
            0.95,
            "--seed",
            7,
        )
        assert proc.stdout == both
    unseeded = dsllm("generate", "--checkpoint", run_dir, "--max-new-tokens", 8)  # no prompt: from <|endoftext|>
    seed = unseeded.stderr.split()[1]
    again = dsllm("generate", "--checkpoint", run_dir, "--max-new-tokens", 8, "--seed", seed)
    assert again.stdout == unseeded.stdout


@pytest.mark.multirank
def test_tokens_stream_as_they_are_produced(run_dir, model_and_tokenizer, monkeypatch):
    """Every token is written and flushed as it comes; the pieces add up to the plain command's output."""
    from dsllm import generate

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.pieces, self.flushed = [], 0

        def write(self, text):
            self.pieces.append(text)
            return super().write(text)

        def flush(self):
            self.flushed += 1

    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    assert (
        generate.main(
            ["--checkpoint", str(run_dir), "--prompt", "doc 5: the", "--max-new-tokens", "20", "--temperature", "0"]
        )
        == 0
    )
    monkeypatch.undo()
    model, tokenizer = model_and_tokenizer
    assert recorder.getvalue() == model_greedy(model, tokenizer, "doc 5: the", 20)
    assert (
        recorder.pieces[0] == "doc 5: the" and len(recorder.pieces) >= 10 and recorder.flushed == len(recorder.pieces)
    )

    # the same through a pipe, read while the command runs
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsllm",
            "generate",
            "--checkpoint",
            str(run_dir),
            "--prompt",
            "doc 5: the",
            "--max-new-tokens",
            "20",
            "--temperature",
            "0",
        ],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
    )
    chunks = []
    while chunk := proc.stdout.read1(4096):
        chunks.append(chunk)
    assert proc.wait() == 0 and b"".join(chunks).decode() == recorder.getvalue()


def test_stream_never_splits_a_character(tokenizer_dir):
    """A character whose UTF-8 bytes are several byte-level tokens is written once all of them are there."""
    from dsllm.generate import TextStream
    from dsllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)  # learned on ASCII: é, 😀 and ü stay one token per byte
    text = "a é 😀 ü"
    ids = tokenizer.encode(text).ids
    assert len(ids) >= len(text.encode()) - 3
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    for token in ids:
        stream.add(token)
    assert stream.finish() == text == "".join(pieces)
    assert not any("\ufffd" in p for p in pieces) and len(pieces) >= 6


@pytest.mark.multirank
def test_generate_refuses_bad_input(run_dir, tmp_path):
    def refused(*args, fragments):
        assert_user_error(dsllm("generate", "--checkpoint", run_dir, *args, expect=None), *fragments)

    refused("--temperature", -1, fragments=["--temperature", "0 (greedy) or more"])
    refused("--temperature", "warm", fragments=["--temperature", "not a number"])
    refused("--top-p", 0, fragments=["--top-p", "above 0"])
    refused("--top-k", 0, fragments=["--top-k", "1 or more"])
    refused("--max-new-tokens", 100, fragments=["--max-new-tokens 100", "model.max_seq_len = 64", "at most 63"])
    refused("--prompt", "doc " * 70, fragments=["no room in the model's context", "shorten it"])
    (tmp_path / "p.jsonl").write_text('"doc 1"\n{"prompt": 3}\n')
    refused("--prompt-file", tmp_path / "p.jsonl", fragments=[f"{tmp_path / 'p.jsonl'}:2:", '{"prompt": str}'])
    (tmp_path / "q.jsonl").write_text('"doc 1"\n\n{"prompt": \n')
    refused("--prompt-file", tmp_path / "q.jsonl", fragments=[f"{tmp_path / 'q.jsonl'}:3:", "malformed JSON"])
    refused("--prompt-file", tmp_path / "none.txt", fragments=["none.txt: no such file"])
    assert_user_error(dsllm("generate", "--checkpoint", tmp_path / "nothing", expect=None), "nothing: no model here")


# -- what a new user meets first: --help ------------------------------------------------------------------
@pytest.mark.parametrize("verb, module", [("evaluate", "evaluation"), ("generate", "generate"), ("export", "export")])
def test_help_explains_every_option_and_answers_at_once(verb, module):
    """Every option has a line of meaning, and building the parser loads no torch (so --help takes a blink)."""
    import importlib

    proc = dsllm(verb, "--help")
    shown = "".join(proc.stdout.split())  # argparse wraps lines, at spaces and hyphens
    parser = importlib.import_module(f"dsllm.{module}").build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 3
    for action in options:
        assert action.option_strings[0] in shown
        assert action.help and len(action.help.split()) >= 4, f"{action.option_strings[0]}: {action.help!r}"
        assert "".join(action.help.split()) in shown
    heavy = "{'torch', 'numpy', 'transformers'}"
    probe = f"import dsllm.{module} as m, sys; m.build_parser(); print(sorted({heavy} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_evaluate_shows_a_bar_only_when_asked_and_on_a_terminal(dataset_dir, monkeypatch):
    """The command asks for progress (a bar when stderr is a terminal); the trainer's evaluation stays silent."""
    from dsllm.data.loader import TokenWindows
    from dsllm.model import GPT
    from dsllm.model_config import ModelConfig
    from dsllm.scoring import eval_indices, evaluate, token_byte_lengths
    from dsllm.tokenizer import load_tokenizer

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model = GPT(ModelConfig(vocab_size=300, max_seq_len=16, n_layers=1, d_model=16, n_heads=2)).eval()
    windows = TokenWindows(dataset_dir / "val", 16)
    lengths = token_byte_lengths(load_tokenizer(dataset_dir / "tokenizer.json"))
    indices = eval_indices(windows, 6)
    said = {}
    for progress in (False, True):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        scores = evaluate(model, windows, indices, 2, "cpu", lengths, progress=progress)
        monkeypatch.undo()
        said[progress] = terminal.getvalue()
        assert scores["tokens"] == 6 * 16
    assert said[False] == "" and "evaluating" in said[True] and "3/3" in said[True]
