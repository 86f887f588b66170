"""Supervised instruction fine-tuning of a pretrained model, on the same engine and loop as pretraining.

    deepspeed --num_gpus 8 launch/finetune.py --ds_config ds_configs/zero2.json --init runs/gpt2 \\
        --data sft.jsonl --out runs/gpt2-sft

--data is JSONL, a line per example: {"prompt": str, "response": str}, or {"messages": [{"role": "system" |
"user" | "assistant", "content": str}, ...]}. Each conversation is rendered with the chat template of
dsllm.sft_data and starts with <|endoftext|> (a new document, as in pretraining). The loss counts the
assistant tokens only (and the <|endoftext|> that ends each reply). Examples are packed into rows of
--seq-len tokens; a block-diagonal causal mask keeps attention inside each example.

Like pretraining it evaluates (validation loss on the reply tokens) every --eval-interval steps, saves a
checkpoint every --save-interval steps, resumes after a kill with --resume auto (bit-exact), stops on a
signal or at --max-time with a checkpoint, and stops when the loss stays non-finite. Before training (a
fresh start) and after it, rank 0 answers the first --eval-examples validation prompts greedily and reports
the exact-match accuracy. The result, --out, is a model folder (model.safetensors, config.json,
tokenizer.json) that generate, evaluate and export take; its checkpoints/ let the run continue.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.cli_args import add_config_arguments, add_launcher_argument, add_recipe_argument, parse_config
from dsllm.errors import ArgumentParser, UserError
from dsllm.run_spec import RunSpec, World
from dsllm.train_config import FinetuneConfig

SUMMARY_FILE = "finetune.json"


if TYPE_CHECKING:  # (imported where used: `dsllm finetune --help` loads no torch)
    from tokenizers import Tokenizer

    from dsllm.checkpoint.checkpointer import Checkpointer
    from dsllm.model import GPT
    from dsllm.sft_data import Packed


@dataclasses.dataclass(frozen=True)
class Finetuning:
    """A checked fine-tuning run: its options, the resolved spec, the data and the resume decision."""

    config: FinetuneConfig
    spec: RunSpec
    model: GPT  # the --init weights, on the CPU: loaded once, in pre-flight, where a damaged file is said
    tokenizer: Tokenizer
    tokenizer_file: Path
    eot: int
    train_set: list[list[dict]]  # conversations: [{"role", "content"}, ...]
    val_set: list[list[dict]]
    packed: Packed
    val_packed: Packed | None
    checkpointer: Checkpointer

    def summary(self) -> dict:
        spec, packed = self.spec, self.packed
        return {
            "init": str(self.config.init),
            "data": self.config.data,
            "train_examples": len(self.train_set),
            "val_examples": len(self.val_set),
            "packed_rows": len(packed.idx),
            "truncated": packed.truncated,
            "dropped": packed.dropped,
            "seq_len": spec.seq_len,
            "world_size": spec.world.size,
            "zero_stage": spec.zero_stage,
            "precision": spec.precision,
            "global_batch_rows": spec.batch.global_size,
            "max_steps": self.config.max_steps,
        }


def split_examples(config: FinetuneConfig) -> tuple[list, list]:
    """(train, validation) conversations: --val-data, or a seeded --val-fraction of --data."""
    from dsllm.sft_data import read_examples

    examples = read_examples(config.data)
    if config.val_data:
        return examples, read_examples(config.val_data)
    shuffled = examples[:]
    random.Random(config.seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * config.val_fraction)) if config.val_fraction > 0 else 0
    if n_val >= len(shuffled):
        raise UserError(
            f"--data {config.data}: {len(examples)} example(s) leave none to train on after "
            f"--val-fraction {config.val_fraction}; add examples or pass --val-data"
        )
    return shuffled[n_val:], shuffled[:n_val]


def preflight(config: FinetuneConfig, world: World | None = None) -> Finetuning:
    """Everything that can fail on the input, before the process group exists."""
    from dsllm.model_dir import load_model_dir
    from dsllm.pretrain import resolve_spec
    from dsllm.sft_data import pack, tokenize
    from dsllm.tokenizer import eot_id
    from dsllm.tuning import check_inputs

    world = world or World.from_env()
    tokenizer, tokenizer_file = check_inputs(config)
    eot = eot_id(tokenizer)
    train_set, val_set = split_examples(config)
    model = load_model_dir(config.init)
    spec = resolve_spec(config, model.config, world)
    packed = pack([tokenize(m, tokenizer, eot) for m in train_set], spec.seq_len)
    if len(packed.idx) == 0:
        raise UserError(f"--data {config.data}: no example keeps a reply token within --seq-len {spec.seq_len}")
    val_packed = pack([tokenize(m, tokenizer, eot) for m in val_set], spec.seq_len) if val_set else None
    from dsllm.checkpoint.checkpointer import Checkpointer

    checkpointer = Checkpointer.for_run(config, spec, packed.fingerprint(), kind="finetune")
    return Finetuning(
        config, spec, model, tokenizer, tokenizer_file, eot, train_set, val_set, packed, val_packed, checkpointer
    )


class ReplyValidator:
    """The validation loss on reply tokens, through the engine on every rank (ZeRO-3 needs them all)."""

    def __init__(self, plan: Finetuning, engine, device, log, data):
        self.plan, self.engine, self.device, self.log, self.data = plan, engine, device, log, data

    def should_validate(self, step: int, last_step: bool) -> bool:
        return self.plan.val_packed is not None and (step % self.plan.config.eval_interval == 0 or last_step)

    def validate(self, step: int) -> dict:
        from dsllm.sft_data import reply_loss

        val_loss = reply_loss(self.engine.ds, self.plan.val_packed, self.device, self.plan.spec.batch.micro)
        self.log.write(
            {"step": step, "val_loss": val_loss, "samples": self.data.consumed_samples},
            f"eval step {step} | val loss {val_loss:.4f}",
        )
        return {"val_loss": val_loss}


def packed_loss(module, batch: dict, device):
    """Fine-tuning's loss of a micro batch of packed rows (idx, targets, positions, mask)."""
    return module(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})[1]


def run(plan: Finetuning) -> dict:
    from dsllm.checkpoint.store import write_json_atomic
    from dsllm.model_dir import load_model_dir, save_model_dir
    from dsllm.sft_data import evaluate_model
    from dsllm.tuning import RowsRun, run_rows

    config, spec = plan.config, plan.spec
    out, summary = Path(config.out), plan.summary()
    header = (
        f"fine-tuning {spec.model.num_parameters():,} parameters from {config.init}: {len(plan.train_set)} "
        f"examples packed into {len(plan.packed.idx)} rows of {spec.seq_len} tokens "
        f"({plan.packed.truncated} cut, {plan.packed.dropped} dropped), {spec.world.size} rank(s), "
        f"ZeRO-{spec.zero_stage}, {spec.precision}, {config.max_steps} steps"
    )

    def scored(model, device, when: str) -> dict:
        result = evaluate_model(model.to(device), plan.tokenizer, plan.eot, plan.val_set, spec.seq_len,
                                config.eval_examples)  # fmt: skip
        line = "{when}: val loss {val_loss:.4f} | exact match {exact_match:.3f} on {exact_match_examples} prompts"
        print(line.format(when=when, **result), flush=True)
        return result

    def before(device) -> None:
        print(
            f"before: scoring {len(plan.val_set)} validation examples and up to {config.eval_examples} prompts "
            "(greedy answers for exact match)",
            flush=True,
        )
        summary["before"] = scored(plan.model, device, "before")

    def finish(last_saved: Path, device) -> None:  # fp32 weights from the ZeRO partitions (any stage)
        final = load_model_dir(last_saved)
        save_model_dir(final, out, plan.tokenizer_file, extra={"finetune": summary})
        if plan.val_set:  # the fp32 weights just written, still in memory
            summary["after"] = scored(final, device, "after")
        write_json_atomic(out / SUMMARY_FILE, summary)
        print(f"fine-tuned model: {out} (dsllm generate --checkpoint {out} --chat --prompt ...)", flush=True)

    run_rows(
        RowsRun(config, spec, plan.checkpointer, plan.model, packed_loss, plan.packed),
        {"finetune": summary}, plan.tokenizer_file, header, before if plan.val_set else None,
        lambda engine, device, log, batches: ReplyValidator(plan, engine, device, log, batches), finish,
    )  # fmt: skip
    return summary


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="dsllm finetune",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_recipe_argument(parser)
    add_config_arguments(parser, FinetuneConfig)
    add_launcher_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dsllm.run_control import run_training

    world = World.from_env()
    return run_training(lambda: preflight(parse_config(FinetuneConfig, build_parser(), argv), world), run, world)
