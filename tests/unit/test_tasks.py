"""`dsllm evaluate --tasks` (issue 17): local multiple-choice tasks scored as lm-evaluation-harness scores them. The
log-likelihood of every choice equals an independent lm-eval-style computation on the exported model in
transformers (context and continuation split as lm-eval's _encode_pair, add_bos_token=True), and so do acc and
acc_norm; bad task files are one line, exit 2."""

import json

import pytest
import torch
from conftest import assert_user_error
from runs import dsllm
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsllm.evaluation import choice_log_likelihoods
from dsllm.export import export_hf
from dsllm.model import GPT
from dsllm.model_config import ModelConfig
from dsllm.model_dir import save_model_dir
from dsllm.tasks import encode_task, read_tasks
from dsllm.tokenizer import load_tokenizer

WORDS = ["red", "green", "blue", "small", "large", "cat", "dog", "tree", "river", "stone", "the", "a"]


def write_tasks(folder, rng):
    colors = [{"text": f"the {rng.choice(WORDS)} {rng.choice(WORDS)} is ", "options": [" red", " green", " blue"],
               "answer": rng.randrange(3)} for _ in range(10)]  # fmt: skip
    sizes = [{"thing": rng.choice(WORDS), "size": rng.choice(["small", "large"])} for _ in range(10)]
    (folder / "colors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in colors))
    (folder / "sizes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sizes))
    (folder / "tasks.yaml").write_text(
        "tasks:\n"
        "  colors: {data: colors.jsonl, context: '{text}', choices: options, target: answer, delimiter: ''}\n"
        "  sizes: {data: sizes.jsonl, context: 'Q: is the {thing} small or large?\\nA:', choices: [small, large],"
        " target: size}\n"
    )
    return folder / "tasks.yaml"


def lm_eval_log_likelihood(hf, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's loglikelihood request with add_bos_token=True, written out against transformers."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    own = tokenizer(context)["input_ids"]
    ids = own + whole[len(own) :]
    with torch.no_grad():
        log_probs = hf(torch.tensor([ids[:-1]])).logits.float().log_softmax(-1)[0]
    return sum(log_probs[i - 1, ids[i]].item() for i in range(len(own), len(ids)))


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tokenizer_dir):
    import random

    root = tmp_path_factory.mktemp("tasks")
    config = ModelConfig(vocab_size=300, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                         positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, mlp_multiple_of=32)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # opinions on colours and sizes
    save_model_dir(model, root / "model", tokenizer_dir / "tokenizer.json")
    export_hf(model, tokenizer_dir / "tokenizer.json", root / "hf")
    return root, model, write_tasks(root, random.Random(0))


def test_each_choice_scores_as_lm_eval_scores_it_in_transformers(scored, tokenizer_dir):
    root, model, task_file = scored
    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    tokenizer = load_tokenizer(tokenizer_dir / "tokenizer.json")
    expected = {}
    for name, (examples, delimiter) in read_tasks(task_file).items():
        encoded = encode_task(tokenizer, examples, delimiter, model.config.max_seq_len)
        acc = acc_norm = 0
        for example, (context, choices) in zip(examples, encoded):
            ours = choice_log_likelihoods(model, context, choices, "cpu")
            theirs = [lm_eval_log_likelihood(hf, hf_tokenizer, example.context, delimiter + c) for c in example.choices]
            assert ours == pytest.approx(theirs, abs=1e-3), example.where
            acc += max(range(len(theirs)), key=theirs.__getitem__) == example.label
            norm = [s / len(c) for s, c in zip(theirs, example.choices)]
            acc_norm += max(range(len(norm)), key=norm.__getitem__) == example.label
        expected[name] = {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples), "examples": len(examples)}
    out = dsllm("evaluate", "--checkpoint", root / "model", "--tasks", task_file)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tasks"] == expected
    assert "scoring 2 task(s)" in out.stderr


@pytest.mark.parametrize(
    "yaml_text, record, message",
    [
        ("tasks: []\n", None, "no 'tasks' mapping of names to tasks"),
        ("tasks:\n  t: {data: t.jsonl, context: '{q}', choices: [a, b], target: y}\n", {"q": "x", "y": "c"},
         "target 'y' is 'c': not one of the choices ['a', 'b']"),
        ("tasks:\n  t: {data: t.jsonl, context: '{missing}', choices: [a, b], target: y}\n", {"q": "x", "y": 0},
         "task 't''s context template needs 'missing', which the record lacks"),
        ("tasks:\n  t: {data: t.jsonl, context: '{q}', choices: c, target: y}\n", {"q": "x", "y": 0, "c": ["only"]},
         "the choices ('c') must be two or more non-empty strings"),
    ],
)  # fmt: skip
def test_bad_task_files_are_one_line_and_exit_2(scored, tmp_path, yaml_text, record, message):
    root = scored[0]
    (tmp_path / "tasks.yaml").write_text(yaml_text)
    if record is not None:
        (tmp_path / "t.jsonl").write_text(json.dumps(record) + "\n")
    assert_user_error(dsllm("evaluate", "--checkpoint", root / "model", "--tasks", tmp_path / "tasks.yaml"), message)
