"""`dsllm evaluate`: loss, perplexity and bits per byte over every target of a split (or a fixed, deterministic
set of its windows, as the training loop's evaluation computes: `dsllm.scoring`), on one process, and
multiple-choice accuracy by log-likelihood."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.errors import ArgumentParser, UserError, positive
from dsllm.jsonl import read_jsonl
from dsllm.scoring import eval_indices, score_totals, split_totals, token_byte_lengths
from dsllm.scoring import scores as score_values
from dsllm.tokenizer import eot_id, tokenizer_hash

if TYPE_CHECKING:  # torch and numpy load inside the functions, so `--help` answers at once
    from tokenizers import Tokenizer

    from dsllm.data.format import TokenFile


# -- multiple choice (HellaSwag-style): which continuation does the model find most likely -----------------
@dataclasses.dataclass
class ChoiceExample:
    context: str
    choices: list[str]
    label: int
    where: str  # FILE:LINE, for errors


def read_choices(path: str | os.PathLike) -> list[ChoiceExample]:
    """`{"context": str, "choices": [str, ...], "label": int}` a line; any other shape is a UserError at FILE:LINE."""
    shape = 'each line needs {"context": str, "choices": [str, str, ...], "label": index of the right choice}'
    examples = []
    for where, record in read_jsonl(path, "--choices"):
        if not isinstance(record, dict):
            raise UserError(f"{where}: a JSON {type(record).__name__}, not an object; {shape}")
        context, choices, label = record.get("context"), record.get("choices"), record.get("label")
        if not isinstance(context, str):
            raise UserError(f"{where}: 'context' is {_kind(context)}, not text; {shape}")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"{where}: 'choices' must be a list of at least two non-empty strings; {shape}")
        if type(label) is not int or not 0 <= label < len(choices):
            raise UserError(
                f"{where}: 'label' is {label!r}; it must be an index into 'choices' (0..{len(choices) - 1})"
            )
        examples.append(ChoiceExample(context, choices, label, where))
    if not examples:
        raise UserError(f"--choices {path}: no examples in the file; {shape}")
    return examples


def _kind(value) -> str:
    return "missing" if value is None else type(value).__name__


def choice_log_likelihoods(model, context: list[int], choices: list[list[int]], device) -> list[float]:
    """Sum of log p(choice tokens | context) for each choice, in one right-padded batch (padding comes after
    every scored position, so the causal mask keeps it out). The context is cut from the left to fit."""
    import torch

    keep = model.config.max_seq_len + 1 - max(map(len, choices))
    context = context[-keep:] if keep > 0 else []
    if not context:
        raise ValueError("a choice is longer than the model's context")
    rows = [context + choice for choice in choices]
    idx = torch.zeros(len(rows), max(map(len, rows)) - 1, dtype=torch.long)
    for r, row in enumerate(rows):
        idx[r, : len(row) - 1] = torch.tensor(row[:-1])
    with torch.no_grad():
        logits, _ = model(idx.to(device))
    log_probs = logits.float().log_softmax(-1).cpu()
    scores = []
    for r, choice in enumerate(choices):
        first = len(context) - 1  # the position whose output predicts the choice's first token
        scores.append(log_probs[r, first : first + len(choice)].gather(-1, torch.tensor(choice)[:, None]).sum().item())
    return scores


def encode_choices(
    tokenizer: Tokenizer, examples: list[ChoiceExample], max_seq_len: int
) -> list[tuple[list[int], list[list[int]]]]:
    """(context, choices) token ids of each example. A context starts a document: it follows <|endoftext|>, as in
    training. Context and choice are tokenized apart, so a choice that continues a sentence should start with a
    space. A choice longer than the model's context is a UserError at its FILE:LINE, before anything is scored."""
    start = [eot_id(tokenizer)]
    encoded = []
    for example in examples:
        choices = [tokenizer.encode(c, add_special_tokens=False).ids for c in example.choices]
        if max(map(len, choices)) > max_seq_len:
            raise UserError(
                f"{example.where}: a choice is longer than the model's context "
                f"(model.max_seq_len = {max_seq_len} tokens); shorten it"
            )
        encoded.append((start + tokenizer.encode(example.context, add_special_tokens=False).ids, choices))
    return encoded


def score_choices(
    model,
    examples: list[ChoiceExample],
    encoded: list[tuple[list[int], list[list[int]]]],
    device,
    progress: bool = False,
) -> dict:
    """Accuracy by the summed log-likelihood of each choice, and by it per character of the choice (as
    lm-evaluation-harness's acc_norm); `encoded` is `encode_choices(...)` of the examples."""
    from tqdm import tqdm

    correct = correct_norm = 0
    pairs = zip(examples, encoded)
    for example, (context, choices) in tqdm(
        pairs, total=len(examples), desc="scoring", unit="example", disable=None if progress else True
    ):
        scores = choice_log_likelihoods(model, context, choices, device)
        per_char = [s / len(c) for s, c in zip(scores, example.choices)]
        correct += max(range(len(scores)), key=scores.__getitem__) == example.label
        correct_norm += max(range(len(per_char)), key=per_char.__getitem__) == example.label
    return {
        "choice_accuracy": correct / len(examples),
        "choice_accuracy_norm": correct_norm / len(examples),
        "choice_examples": len(examples),
    }


# -- `python -m dsllm evaluate` ------------------------------------------------------------------------------
def open_split(data: Path, split: str, tokenizer: Tokenizer, tokenizer_file: Path) -> TokenFile:
    """The split's token file, refused when it was made with another tokenizer than the model's."""
    from dsllm.data.shards import has_split, open_token_file

    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder; pass a dataset made by data_pipeline/prepare.py")
    if not has_split(data, split):
        raise UserError(
            f"--data {data}: no {split} split ({split}.idx); pass a folder made by "
            "data_pipeline/prepare.py and --split train or val"
        )
    tokens = open_token_file(data, split)  # a sharded dataset's too
    if tokens.header.tokenizer_hash != tokenizer_hash(tokenizer):
        raise UserError(
            f"--data {data}: made with another tokenizer (hash {tokens.header.tokenizer_hash.hex()[:16]}) "
            f"than the model's {tokenizer_file} ({tokenizer_hash(tokenizer).hex()[:16]}); prepare the "
            f"data with data_pipeline/prepare.py --tokenizer {tokenizer_file}"
        )
    return tokens


def run_seq_len(config_file: Path) -> int | None:
    """The sequence length the run trained with (config.json's run.seq_len); None for a plain model folder."""
    return (json.loads(config_file.read_text()).get("run") or {}).get("seq_len")


def run_document_mask(config_file: Path) -> bool:
    """Whether the run trained with --document-mask (config.json's train.document_mask); False for a model folder."""
    return bool((json.loads(config_file.read_text()).get("train") or {}).get("document_mask"))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="dsllm evaluate",
        description="Validation loss, perplexity and bits per byte of a model on a token dataset (and "
        "multiple-choice accuracy), printed as one JSON object on stdout; progress goes to stderr.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR",
        help="the model to evaluate: a run folder (its final weights, else its newest checkpoint), a "
        "checkpoints/stepNNNNNNNN folder (any ZeRO stage and world size), or a model folder",
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="token dataset made by data_pipeline/prepare.py with the model's tokenizer (loss, perplexity, bits "
        "per byte); --data, --choices or both",
    )
    parser.add_argument("--split", default="val", metavar="NAME", help="which split of --data to score: val or train")
    parser.add_argument(
        "--max-windows",
        type=positive,
        metavar="N",
        help="score N windows spread evenly over the split, as the trainer's --eval-windows (default: the whole split, "
        "--whole-split)",
    )
    parser.add_argument(
        "--whole-split",
        action="store_true",
        help="score every target of the split: every window and the tokens after the last full one (the default "
        "without --max-windows)",
    )
    parser.add_argument(
        "--batch-size", type=positive, default=8, metavar="B", help="windows per forward pass; lower it to save memory"
    )
    parser.add_argument(
        "--seq-len",
        type=positive,
        metavar="T",
        help="tokens per window (default: the run's training --seq-len, else model.max_seq_len)",
    )
    parser.add_argument(
        "--document-mask",
        action=argparse.BooleanOptionalAction,
        help="attention inside each document of a window (the <|endoftext|> starting each one), as pretraining's "
        "--document-mask (default: as the run trained)",
    )
    parser.add_argument(
        "--choices",
        metavar="FILE.jsonl",
        help='multiple-choice accuracy over a file of {"context": str, "choices": [str, ...], "label": int} a line',
    )
    parser.add_argument(
        "--tasks",
        metavar="FILE.yaml",
        help="multiple-choice tasks scored as lm-evaluation-harness scores them (acc, acc_norm): a YAML or JSON "
        "file naming each task's JSONL examples, context template, choices and target (dsllm/tasks.py)",
    )
    parser.add_argument(
        "--device", default="auto", help="where to run: auto (cuda when available, else cpu), cpu, cuda or cuda:N"
    )
    return parser


def say(text: str) -> None:
    """A progress line on stderr (stdout holds only the JSON result)."""
    print(text, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """`python -m dsllm evaluate --checkpoint RUN_DIR --data DIR [--split val] [--choices FILE.jsonl]`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is None and args.choices is None and args.tasks is None:
        parser.error("nothing to evaluate; pass --data DIR, --choices FILE.jsonl, --tasks FILE.yaml, or several")
    if args.whole_split and args.max_windows is not None:
        raise UserError(
            f"--whole-split with --max-windows {args.max_windows}: the whole split is every window; pass one of them"
        )
    # the heavy imports (torch) come after parsing, so --help and a bad option answer at once
    from dsllm.data.loader import TokenWindows
    from dsllm.model_dir import WEIGHTS_FILE, load_model_dir, model_tokenizer, pick_device, resolve_model_source

    config_file, checkpoint, home = resolve_model_source(args.checkpoint)
    tokenizer, tokenizer_file = model_tokenizer(home)
    tokens = open_split(Path(args.data), args.split, tokenizer, tokenizer_file) if args.data else None
    examples = read_choices(args.choices) if args.choices else None
    if args.tasks:
        from dsllm.tasks import read_tasks

        tasks = read_tasks(args.tasks)
    device = pick_device(args.device)
    model = load_model_dir(args.checkpoint, device).eval()
    result: dict = {"checkpoint": str(checkpoint or home / WEIGHTS_FILE)}
    # every check comes before the first line of progress, so a refusal stays one line on stderr
    if tokens is not None:
        seq_len = args.seq_len or run_seq_len(config_file) or model.config.max_seq_len
        model.config.check_seq_len(seq_len)
        windows = TokenWindows(tokens, seq_len)
        if len(windows) == 0:
            raise UserError(
                f"--data {args.data}: the {args.split} split has {tokens.num_tokens} tokens, not one window "
                f"of {seq_len + 1}; pass a shorter --seq-len"
            )
        whole = args.max_windows is None  # every target: the full windows and the tail after them
        indices = eval_indices(windows, args.max_windows or len(windows))
        tail = windows.tail() if whole else None
    if examples is not None:
        encoded = encode_choices(tokenizer, examples, model.config.max_seq_len)
    if args.tasks:
        from dsllm.tasks import encode_task

        tasks = {  # (refusals before the first progress line)
            name: (of, encode_task(tokenizer, of, delimiter, model.config.max_seq_len))
            for name, (of, delimiter) in tasks.items()
        }
    if tokens is not None:
        say(
            f"evaluating {len(indices):,} of {len(windows):,} windows ({seq_len} tokens each) of the {args.split} "
            f"split in batches of {args.batch_size} on {device}"
            + (f", then the last {len(tail) - 1} targets after them" if tail is not None else "")
        )
        score = model
        masked = run_document_mask(config_file) if args.document_mask is None else args.document_mask
        if masked:  # scored as such a run trains and validates: attention inside each document
            from dsllm.data.documents import document_scored

            score = document_scored(model, eot_id(tokenizer))
        lengths = token_byte_lengths(tokenizer)
        if whole:
            totals = split_totals(score, windows, args.batch_size, device, lengths, progress=True)
        else:
            totals = score_totals(score, windows, indices, args.batch_size, device, lengths, progress=True)
        scores = score_values(*totals)
        result.update(
            {
                "data": str(args.data),
                "split": args.split,
                "seq_len": seq_len,
                "document_mask": masked,
                "windows": len(indices),
                "windows_in_split": len(windows),
                "whole_split": whole,
                "tail_tokens": len(tail) - 1 if tail is not None else 0,
                "tokens": scores["tokens"],
                "bytes": int(totals[2]),
                "loss": scores["val_loss"],
                "perplexity": scores["perplexity"],
                "bits_per_byte": scores["bits_per_byte"],
            }
        )
    if examples is not None:
        choices = sum(len(example.choices) for example in examples)
        say(f"scoring {len(examples):,} multiple-choice examples ({choices:,} choices) from {args.choices} on {device}")
        result.update({"choices": str(args.choices), **score_choices(model, examples, encoded, device, progress=True)})
    if args.tasks:
        from dsllm.tasks import score_tasks

        say(f"scoring {len(tasks)} task(s) from {args.tasks} on {device}: {', '.join(tasks)}")
        result["tasks"] = score_tasks(model, tasks, device)
    print(json.dumps(result))
    return 0
