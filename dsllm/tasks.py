"""`dsllm evaluate --tasks FILE`: local multiple-choice tasks, scored as lm-evaluation-harness scores its
`multiple_choice` tasks, so a number here and one from `lm_eval` on the exported model mean the same thing.

A task file (YAML or JSON) names each task's JSONL examples and how to read them, as an lm-eval task YAML does
(`doc_to_text`, `doc_to_choice`, `doc_to_target`, `target_delimiter`)::

    tasks:
      sentiment:
        data: sentiment.jsonl                  # relative to the task file
        context: "Review: {text}\\nSentiment:"  # a str.format template over each record's fields
        choices: [negative, positive]          # a list, or the name of the field that holds each record's list
        target: label                          # the field with the right choice: its index, or its text
        delimiter: " "                         # put between context and choice (lm-eval's default)

Scoring, as lm-eval's: each choice's continuation is the delimiter + the choice; whitespace that ends the context
moves to the continuation; the continuation's tokens are those of context + continuation after the context's own
(`encode_pair`); its summed log-likelihood after the context picks `acc`, the same divided by the choice's length in
characters `acc_norm`. The context starts after the tokenizer's document token, as every training document did
(lm-eval adds it with `add_bos_token=True`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.errors import UserError
from dsllm.evaluation import ChoiceExample
from dsllm.jsonl import read_jsonl

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_SHAPE = "each task needs data (a JSONL file), context (a template), choices (a list or a field) and target (a field)"


def read_tasks(path: str | Path) -> dict[str, tuple[list[ChoiceExample], str]]:
    """{task name: (its examples, its delimiter)} of a task file; any problem is a UserError naming the task, or the
    example's FILE:LINE."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--tasks {path}: no such file; pass a YAML or JSON task file")
    try:
        spec = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (ValueError, yaml.YAMLError) as err:
        raise UserError(f"--tasks {path}: not {'YAML' if path.suffix != '.json' else 'JSON'} ({err})") from None
    tasks = spec.get("tasks") if isinstance(spec, dict) else None
    if not isinstance(tasks, dict) or not tasks:
        raise UserError(f"--tasks {path}: no 'tasks' mapping of names to tasks; {_SHAPE}")
    return {name: _read_task(path, str(name), task) for name, task in tasks.items()}


def _read_task(path: Path, name: str, task) -> tuple[list[ChoiceExample], str]:
    where = f"--tasks {path}: task {name!r}"
    if not isinstance(task, dict) or not all(isinstance(task.get(k), str) for k in ("data", "context", "target")):
        raise UserError(f"{where}: {_SHAPE}")
    choices, delimiter = task.get("choices"), task.get("delimiter", " ")
    if not (isinstance(choices, str) or (isinstance(choices, list) and len(choices) >= 2)):
        raise UserError(f"{where}: choices must be a list of two or more, or the name of a field holding one")
    examples = []
    for line, record in read_jsonl(path.parent / task["data"], f"{where} data"):
        if not isinstance(record, dict):
            raise UserError(f"{line}: a JSON {type(record).__name__}, not an object")
        try:
            context = task["context"].format_map(record)
        except (KeyError, IndexError, ValueError) as err:
            raise UserError(f"{line}: task {name!r}'s context template needs {err}, which the record lacks") from None
        options = record.get(choices) if isinstance(choices, str) else choices
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(c, str) and c for c in options):
            raise UserError(f"{line}: the choices ({choices!r}) must be two or more non-empty strings")
        target = record.get(task["target"])
        label = options.index(target) if isinstance(target, str) and target in options else target
        if type(label) is not int or not 0 <= label < len(options):
            raise UserError(
                f"{line}: target {task['target']!r} is {target!r}: not one of the choices {options} nor an index "
                f"into them (0..{len(options) - 1})"
            )
        examples.append(ChoiceExample(context, [str(c) for c in options], label, line))
    if not examples:
        raise UserError(f"{where}: {task['data']} holds no examples")
    return examples, delimiter


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of context + continuation into token ids: whitespace ending the context goes to the
    continuation, and the continuation's tokens are the whole text's after the context's own."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    own = tokenizer.encode(context, add_special_tokens=False).ids
    return own, whole[len(own) :]


def encode_task(
    tokenizer: Tokenizer, examples: list[ChoiceExample], delimiter: str, max_seq_len: int
) -> list[tuple[list[int], list[list[int]]]]:
    """(context, choices) token ids of each example, `evaluation.score_choices`' input."""
    from dsllm.tokenizer import eot_id

    start, encoded = [eot_id(tokenizer)], []
    for example in examples:
        pairs = [encode_pair(tokenizer, example.context, delimiter + choice) for choice in example.choices]
        context, choices = pairs[0][0], [continuation for _, continuation in pairs]
        if not all(choices):
            raise UserError(f"{example.where}: a choice has no tokens of its own after the context")
        if max(map(len, choices)) > max_seq_len:
            raise UserError(f"{example.where}: a choice is longer than the model's context ({max_seq_len} tokens)")
        encoded.append((start + context, choices))
    return encoded


def score_tasks(model, encoded_tasks: dict, device) -> dict:
    """{task: {"acc", "acc_norm", "examples"}}, lm-eval's multiple-choice metrics, of {task: (examples,
    `encode_task` of them)}."""
    from dsllm.evaluation import score_choices

    results = {}
    for name, (examples, encoded) in encoded_tasks.items():
        scored = score_choices(model, examples, encoded, device, progress=True)
        results[name] = {
            "acc": scored["choice_accuracy"],
            "acc_norm": scored["choice_accuracy_norm"],
            "examples": scored["choice_examples"],
        }
    return results
