"""Classification fine-tuning (`dsllm finetune-classify`): a pretrained or imported model with a linear head on its
last token's final hidden state, trained on labelled texts on the same engine, loop and checkpoints as pretraining.

    deepspeed --num_gpus 8 launch/finetune_classify.py --ds_config ds_configs/zero2.json --init runs/gpt2 \\
        --data reviews.csv --text-column review --label-column sentiment --out runs/gpt2-sentiment

--data is CSV (a header row) or JSONL, one example a row; --labels fixes the label set and its order (default: the
training labels, sorted). Each text is tokenized after the document token, as every pretraining document starts,
cut to --seq-len (default: the model's context), and padded to the longest example: one shape for every batch. The
head reads the hidden state of each text's last token (causal attention: the one that has seen all of it) and starts
at zero, so the first predictions are chance. Accuracy and macro F1 on the validation examples are measured before
training and after every epoch (--eval-interval steps), logged and written to classify.json. --out is a model folder
(the fine-tuned backbone: generate, evaluate and export take it) with the head in classifier.safetensors and the
labels in config.json; its checkpoints/ resume after a kill (--resume auto), bit for bit.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.cli_args import add_config_arguments, add_launcher_argument, add_recipe_argument, parse_config
from dsllm.errors import ArgumentParser, UserError
from dsllm.jsonl import read_jsonl
from dsllm.run_spec import RunSpec, World
from dsllm.train_config import ClassifyConfig

HEAD_FILE = "classifier.safetensors"

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from dsllm.checkpoint.checkpointer import Checkpointer
    from dsllm.model import GPT


# -- data -------------------------------------------------------------------------------------------------------
def read_labelled(path: str, text_column: str, label_column: str, option: str) -> list[tuple[str, str, str]]:
    """(text, label as text, FILE:LINE) of each example of a CSV or JSONL file; a missing column, an empty text or a
    missing label is a UserError at its FILE:LINE."""
    file = Path(path)
    if file.suffix not in (".csv", ".jsonl"):
        raise UserError(f"{option} {path}: not a .csv or .jsonl file; write the examples as CSV (a header) or JSONL")
    if not file.is_file():
        raise UserError(f"{option} {path}: no such file")
    rows: list[tuple[str, dict]] = []
    if file.suffix == ".csv":
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for name in (text_column, label_column):
                if name not in (reader.fieldnames or []):
                    flag = "--text-column" if name == text_column else "--label-column"
                    raise UserError(
                        f"{file}:1: no column {name!r} (columns: {', '.join(reader.fieldnames or [])}); pass {flag}"
                    )
            rows = [(f"{file}:{reader.line_num}", row) for row in reader]
    else:
        for where, record in read_jsonl(file, option):
            if not isinstance(record, dict):
                raise UserError(f"{where}: a JSON {type(record).__name__}, not an object with {text_column!r} and "
                                f"{label_column!r}")  # fmt: skip
            rows.append((where, record))
    examples = []
    for where, row in rows:
        for name, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if row.get(name) in (None, ""):
                raise UserError(f"{where}: no {name!r} (fields: {', '.join(map(str, row))}); fill it or pass {flag}")
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: {text_column!r} is {type(text).__name__}, not text; each example needs a text")
        if isinstance(label, (dict, list)):
            raise UserError(f"{where}: {label_column!r} is a {type(label).__name__}; a label is one text or number")
        examples.append((text, str(label).lower() if isinstance(label, bool) else str(label), where))
    if not examples:
        raise UserError(f"{option} {path}: no examples in the file")
    return examples


def label_names(config: ClassifyConfig, train: list[tuple[str, str, str]]) -> list[str]:
    """--labels in order, or the training labels sorted; at least two."""
    if config.labels is not None:
        names = [name.strip() for name in config.labels.split(",")]
        if any(not name for name in names) or len(set(names)) != len(names):
            raise UserError(f"--labels {config.labels}: give distinct, non-empty labels separated by commas")
    else:
        names = sorted({label for _, label, _ in train})
    if len(names) < 2:
        raise UserError(f"--data {config.data}: one label ({names[0]!r}) only; a classifier needs two or more")
    return names


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Labelled texts as token rows: `idx[i]` [document token, text tokens...] (at most `length`), `labels[i]` the
    label's index. `batch(rows)` pads them to `length` (one shape for every batch)."""

    idx: list[list[int]]
    labels: list[int]
    length: int
    pad: int

    def batch(self, rows: list[int]) -> dict:
        import torch

        idx = torch.full((len(rows), self.length), self.pad, dtype=torch.long)
        for r, row in enumerate(rows):
            idx[r, : len(self.idx[row])] = torch.tensor(self.idx[row])
        last = torch.tensor([len(self.idx[row]) - 1 for row in rows])
        return {"idx": idx, "last": last, "labels": torch.tensor([self.labels[row] for row in rows])}

    def fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps([self.idx, self.labels, self.length]).encode())
        return digest.hexdigest()[:16]


def encode(examples, names: list[str], tokenizer: Tokenizer, start: int, max_len: int, option: str) -> Encoded:
    """Token rows of (text, label, where) examples, each cut to `max_len`; a label outside `names` is a UserError."""
    from dsllm.tokenizer import encode_as_text

    index = {name: i for i, name in enumerate(names)}
    for _, label, where in examples:
        if label not in index:
            raise UserError(
                f"{where}: label {label!r} is not one of the labels {', '.join(names)} ({option}); fix the label, or "
                "name it in --labels"
            )
    ids = encode_as_text(tokenizer, [text for text, _, _ in examples])
    rows = [([start] + row)[:max_len] for row in ids]
    return Encoded(rows, [index[label] for _, label, _ in examples], max(map(len, rows)), start)


# -- the model --------------------------------------------------------------------------------------------------
def classifier(gpt: GPT, labels: int) -> torch.nn.Module:
    """`gpt` with a linear head (zero at the start: chance) over its last token's final hidden state; its LM head,
    unused, is frozen (a tied one is the embedding and trains as such)."""
    import torch
    import torch.nn.functional as F

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt, self.head = gpt, torch.nn.Linear(gpt.config.d_model, labels)
            self.config = gpt.config
            torch.nn.init.zeros_(self.head.weight), torch.nn.init.zeros_(self.head.bias)
            if not gpt.config.tie_embeddings:
                gpt.lm_head.weight.requires_grad_(False)

        def forward(self, idx, last, labels=None):
            hidden = self.gpt.features(idx)
            logits = self.head(hidden[torch.arange(idx.shape[0], device=idx.device), last]).float()
            return logits, None if labels is None else F.cross_entropy(logits, labels)

    return Classifier()


def save_with_head(weights: dict, model_config, out: Path, tokenizer_file: Path, extra: dict, head_file: str) -> None:
    """A `classifier`'s fp32 weights: the backbone as a model folder in `out` (generate, evaluate and export take
    it), the head in `out / head_file`."""
    from safetensors.torch import save_file

    from dsllm.model import GPT
    from dsllm.model_dir import save_model_dir

    backbone = GPT(model_config)
    backbone.load_state_dict({k.removeprefix("gpt."): v for k, v in weights.items() if k.startswith("gpt.")})
    save_model_dir(backbone, out, tokenizer_file, extra=extra)
    head = {k.removeprefix("head."): weights[k].contiguous() for k in ("head.weight", "head.bias")}
    save_file(head, str(out / head_file))


def classify_loss(module, batch: dict, device):
    return module(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})[1]


def scores(predicted: list[int], truth: list[int], labels: int) -> dict:
    """Accuracy and macro F1 (the mean over the labels that occur in the truth or the predictions)."""
    f1s = []
    for label in range(labels):
        tp = sum(p == t == label for p, t in zip(predicted, truth))
        wrong = sum((p == label) != (t == label) for p, t in zip(predicted, truth))
        if tp or wrong:
            f1s.append(2 * tp / (2 * tp + wrong))
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    return {"accuracy": accuracy, "f1_macro": sum(f1s) / len(f1s)}


def predict(forward, encoded: Encoded, device, per_forward: int) -> tuple[list[int], float]:
    """(predicted label of every row, mean loss); `forward` the model or DeepSpeed's engine (ZeRO-3: every rank calls
    it for every row)."""
    import torch

    predicted, loss = [], 0.0
    with torch.no_grad():
        for start in range(0, len(encoded.idx), per_forward):
            rows = list(range(start, min(start + per_forward, len(encoded.idx))))
            batch = {k: v.to(device) for k, v in encoded.batch(rows).items()}
            logits, batch_loss = forward(batch["idx"], batch["last"], batch["labels"])
            predicted += logits.argmax(-1).tolist()
            loss += float(batch_loss) * len(rows)
    return predicted, loss / len(encoded.idx)


# -- the run ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Classifying:
    config: ClassifyConfig  # resolved: --max-steps and --eval-interval counted from the data
    spec: RunSpec
    model: GPT
    labels: list[str]
    train: Encoded
    val: Encoded
    steps_per_epoch: int
    tokenizer_file: Path
    checkpointer: Checkpointer


def preflight(config: ClassifyConfig, world: World | None = None) -> Classifying:
    """Everything that can fail on the input, before the process group exists."""
    from dsllm.model_dir import load_model_dir
    from dsllm.tokenizer import eot_id
    from dsllm.tuning import check_inputs, epoch_plan, split_held_out

    world = world or World.from_env()
    tokenizer, tokenizer_file = check_inputs(config)

    def read(path: str, flag: str) -> list:
        return read_labelled(path, config.text_column, config.label_column, flag)

    train, val = split_held_out(config, read, "example")
    names = label_names(config, train)
    model = load_model_dir(config.init)
    max_len = min(config.seq_len or model.config.max_seq_len, model.config.max_seq_len)
    start = eot_id(tokenizer)
    encoded = encode(train, names, tokenizer, start, max_len, "--data")
    val_encoded = encode(val, names, tokenizer, start, max_len, "--val-data" if config.val_data else "--data")
    length = max(encoded.length, val_encoded.length)
    encoded = dataclasses.replace(encoded, length=length)
    val_encoded = dataclasses.replace(val_encoded, length=length)
    config, spec, steps_per_epoch = epoch_plan(config, model.config, world, len(encoded.idx), length)
    from dsllm.checkpoint.checkpointer import Checkpointer

    checkpointer = Checkpointer.for_run(config, spec, encoded.fingerprint(), kind="classify")
    return Classifying(config, spec, model, names, encoded, val_encoded, steps_per_epoch, tokenizer_file, checkpointer)


def run(plan: Classifying) -> dict:
    from dsllm.model_dir import CONFIG_FILE
    from dsllm.tuning import Tuning, run_tuning

    config, spec = plan.config, plan.spec
    record = {"labels": plan.labels, "text_column": config.text_column, "label_column": config.label_column}

    def score(forward, device) -> dict:
        predicted, loss = predict(forward, plan.val, device, spec.batch.micro)
        return {"val_loss": loss, **scores(predicted, plan.val.labels, len(plan.labels))}

    def save(weights: dict, out: Path) -> None:
        save_with_head(weights, spec.model, out, plan.tokenizer_file, {"classifier": record}, HEAD_FILE)
        print(f"classifier: {out} ({HEAD_FILE}, labels in {CONFIG_FILE})", flush=True)

    header = (
        f"classification fine-tuning of {spec.model.num_parameters():,} parameters from {config.init}: "
        f"{len(plan.train.idx)} examples ({len(plan.labels)} labels: {', '.join(plan.labels)}), "
        f"{plan.steps_per_epoch} steps an epoch, {config.max_steps} steps, {spec.world.size} rank(s), "
        f"ZeRO-{spec.zero_stage}, {spec.precision}"
    )
    summary = {
        "init": str(config.init),
        "data": config.data,
        "train_examples": len(plan.train.idx),
        "val_examples": len(plan.val.idx),
        "labels": plan.labels,
        "tokens_per_example": plan.train.length,
        "steps_per_epoch": plan.steps_per_epoch,
        "max_steps": config.max_steps,
    }
    tuning = Tuning(
        "classify", config, spec, plan.checkpointer, classifier(plan.model, len(plan.labels)), classify_loss,
        plan.train, score, record, save, summary, plan.tokenizer_file, header, plan.steps_per_epoch,
    )  # fmt: skip
    return run_tuning(tuning)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="dsllm finetune-classify", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1]
    )
    add_recipe_argument(parser)
    add_config_arguments(parser, ClassifyConfig)
    add_launcher_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dsllm.run_control import run_training

    world = World.from_env()
    return run_training(lambda: preflight(parse_config(ClassifyConfig, build_parser(), argv), world), run, world)
