"""Supervised instruction fine-tuning of a pretrained run on the DeepSpeed engine (`launch/finetune.py`).

    deepspeed --num_gpus 8 launch/finetune.py --ds_config ds_configs/zero2.json --init runs/gpt2 \
        --data sft.jsonl --out runs/gpt2-sft

--data is JSONL, a line per example: {"prompt": str, "response": str}, or {"messages": [{"role": "system" |
"user" | "assistant", "content": str}, ...]}. Each conversation is rendered with the chat template below and
starts with <|endoftext|> (a new document, as in pretraining). The loss counts the assistant tokens only (and
the <|endoftext|> that ends each reply). Examples are packed into rows of --seq-len tokens; a block-diagonal
causal mask keeps attention inside each example and positions restart at 0 for each.

    <|user|>
    {content}
    <|assistant|>
    {content}<|endoftext|>

Before and after training, rank 0 answers the first --eval-examples validation prompts greedily and reports
the exact-match accuracy with the validation loss; the result is a model folder (model.safetensors,
config.json, tokenizer.json) that generate, evaluate and export take.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from pathlib import Path

import torch

from dsllm.errors import ArgumentParser, UserError, positive
from dsllm.jsonl import read_jsonl
from dsllm.tokenizer import encode_as_text

ROLES = ("system", "user", "assistant")
SUMMARY_FILE = "finetune.json"


def render(messages: list[dict]) -> list[tuple[str, bool]]:
    """[(text, trained)] of a conversation: headers and user/system text are context, assistant text is trained."""
    parts = []
    for message in messages:
        parts.append((f"<|{message['role']}|>\n", False))
        if message["role"] == "assistant":
            parts.append((message["content"], True))
        else:
            parts.append((message["content"] + "\n", False))
    return parts


def read_examples(path: str) -> list[list[dict]]:
    """Conversations from JSONL; every fault is `FILE:LINE` and what to write instead."""
    examples = []
    for where, value in read_jsonl(path, "--data"):
        if isinstance(value, dict) and "messages" in value:
            messages = value["messages"]
            if (
                not isinstance(messages, list)
                or not messages
                or not all(
                    isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                    for m in messages
                )
            ):
                raise UserError(f'{where}: "messages" must be a list of {{"role": {"/".join(ROLES)}, "content": str}}')
            if not any(m["role"] == "assistant" for m in messages):
                raise UserError(f"{where}: no assistant message: nothing to learn from this example")
        elif (
            isinstance(value, dict) and isinstance(value.get("prompt"), str) and isinstance(value.get("response"), str)
        ):
            messages = [
                {"role": "user", "content": value["prompt"]},
                {"role": "assistant", "content": value["response"]},
            ]
        else:
            raise UserError(f'{where}: expected {{"prompt": str, "response": str}} or {{"messages": [...]}}')
        examples.append(messages)
    if not examples:
        raise UserError(f"--data {path}: no examples")
    return examples


def tokenize(messages: list[dict], tokenizer, eot: int) -> tuple[list[int], list[bool]]:
    """(ids, trained) of one conversation: <|endoftext|> first, each assistant reply followed by <|endoftext|>."""
    ids, trained = [eot], [False]
    for text, is_reply in render(messages):
        piece = encode_as_text(tokenizer, [text])[0]  # a literal <|endoftext|> in an example is text, as in prepare
        ids += piece
        trained += [is_reply] * len(piece)
        if is_reply:
            ids.append(eot)
            trained.append(True)
    return ids, trained


def context_ids(messages: list[dict], tokenizer, eot: int) -> list[int]:
    """What the model sees before it answers the last message: tokenized piece by piece exactly as in training
    (one string would let BPE merge across the template's pieces)."""
    ids, _ = tokenize(messages, tokenizer, eot)
    return ids + encode_as_text(tokenizer, ["<|assistant|>\n"])[0]


@dataclasses.dataclass
class Packed:
    """Rows of packed examples: inputs, targets (-100 where no loss), positions, segment (-1: padding)."""

    idx: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    segments: torch.Tensor
    truncated: int
    dropped: int

    def batch(self, rows: list[int]) -> dict:
        seg = self.segments[rows]
        T = seg.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, None, :] >= 0)
        mask |= torch.eye(T, dtype=torch.bool)  # a padding position sees itself: no empty softmax row
        return {
            "idx": self.idx[rows],
            "targets": self.targets[rows],
            "positions": self.positions[rows],
            "mask": mask[:, None],
        }


def pack(examples: list[tuple[list[int], list[bool]]], seq_len: int) -> Packed:
    """Greedy packing in order: an example whose n - 1 (input, target) pairs do not fit the row starts the next
    one. Longer examples are cut to seq_len + 1 tokens; an example with no trained token left is dropped."""
    rows, row, truncated, dropped = [], [], 0, 0
    for ids, trained in examples:
        if len(ids) > seq_len + 1:
            ids, trained, truncated = ids[: seq_len + 1], trained[: seq_len + 1], truncated + 1
        if not any(trained[1:]):
            dropped += 1
            continue
        pairs = len(ids) - 1
        if sum(len(i) - 1 for i, _ in row) + pairs > seq_len:
            rows.append(row)
            row = []
        row.append((ids, trained))
    if row:
        rows.append(row)
    n = len(rows)
    idx, targets = torch.zeros(n, seq_len, dtype=torch.long), torch.full((n, seq_len), -100, dtype=torch.long)
    positions, segments = torch.zeros(n, seq_len, dtype=torch.long), torch.full((n, seq_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        start = 0
        for s, (ids, trained) in enumerate(members):
            k = len(ids) - 1
            idx[r, start : start + k] = torch.tensor(ids[:-1])
            targets[r, start : start + k] = torch.tensor([t if keep else -100 for t, keep in zip(ids[1:], trained[1:])])
            positions[r, start : start + k] = torch.arange(k)
            segments[r, start : start + k] = s
            start += k
    return Packed(idx, targets, positions, segments, truncated, dropped)


class PackedBatches:
    """Micro batches of rows for one rank: a seeded shuffle per epoch, the same global order on any world size."""

    def __init__(self, packed: Packed, micro: int, seed: int, rank: int, world: int):
        self.packed, self.micro, self.seed, self.rank, self.world = packed, micro, seed, rank, world
        self.epoch, self.order, self.cursor = 0, [], 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        need = self.micro * self.world
        while len(self.order) - self.cursor < need:  # next epoch appended; rows repeat only across epochs
            order = list(range(len(self.packed.idx)))
            random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
            self.order, self.cursor, self.epoch = self.order[self.cursor :] + order, 0, self.epoch + 1
        rows = self.order[self.cursor : self.cursor + need][self.rank * self.micro : (self.rank + 1) * self.micro]
        self.cursor += need
        return self.packed.batch(rows)


@torch.no_grad()
def evaluate_model(model, tokenizer, eot: int, val: list[list[dict]], seq_len: int, examples: int) -> dict:
    """Validation loss on reply tokens (packed as in training) and greedy exact match on single-turn examples."""
    model.eval()
    device = model.lm_head.weight.device
    packed = pack([tokenize(m, tokenizer, eot) for m in val], seq_len)
    total, count = 0.0, 0
    for start in range(0, len(packed.idx), 8):
        batch = {k: v.to(device) for k, v in packed.batch(list(range(start, min(start + 8, len(packed.idx))))).items()}
        logits, _ = model(batch["idx"], positions=batch["positions"], mask=batch["mask"])
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-100, reduction="sum"
        )
        total, count = total + loss.item(), count + int((batch["targets"] != -100).sum())
    singles = [m for m in val if len(m) == 2 and m[0]["role"] == "user" and m[1]["role"] == "assistant"][:examples]
    right = 0
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    for messages in singles:
        context = context_ids(messages[:1], tokenizer, eot)
        room = model.config.max_seq_len - len(context)
        budget = min(room, len(encode_as_text(tokenizer, [messages[1]["content"]])[0]) + 8)
        if budget < 1:
            continue
        new = model.generate([context], budget, temperature=0.0, eos_id=eot, vocab_size=vocab)[0]
        answer = tokenizer.decode([t for t in new if t != eot])
        right += answer.strip() == messages[1]["content"].strip()
    return {
        "val_loss": total / max(count, 1),
        "exact_match": right / max(len(singles), 1),
        "exact_match_examples": len(singles),
    }


def main(argv=None) -> int:
    from dsllm.checkpoint import CONFIG_FILE, load_model_dir, model_tokenizer, resolve_model_source, save_model_dir
    from dsllm.ds_config import load_ds_config
    from dsllm.metrics import MetricsLog
    from dsllm.paths import check_output_apart, model_inputs
    from dsllm.tokenizer import eot_id
    from dsllm.train_checkpoint import COMPLETE_MARKER, write_json_atomic
    from dsllm.train_config import TrainConfig, world_from_env
    from dsllm.trainer import Plan, build_engine, deepspeed_config, init_distributed, train_step

    p = ArgumentParser(
        prog="finetune.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ds_config", "--ds-config", dest="ds_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)"
    )
    p.add_argument("--init", required=True, help="the pretrained run folder, checkpoint or model folder")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--val-data", help="validation JSONL (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held out when there is no --val-data")
    p.add_argument("--out", required=True, help="the fine-tuned model folder")
    p.add_argument("--max-steps", type=positive, default=200)
    p.add_argument("--seq-len", type=positive, help="packed row length (default: the model's max_seq_len)")
    p.add_argument("--micro-batch-size", type=positive, default=8)
    p.add_argument("--grad-accum", type=positive)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--precision", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-interval", type=positive, default=10)
    p.add_argument("--eval-examples", type=int, default=64, help="validation prompts answered for exact match")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rank, local_rank, world = world_from_env()
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction}: must be in [0, 1)")

    # -- everything that can fail on the input, before the process group exists
    inputs = model_inputs(args.init, "--init") + [("--data", args.data), ("--ds_config", args.ds_config)]
    check_output_apart(args.out, "--out", inputs + ([("--val-data", args.val_data)] if args.val_data else []))
    tokenizer, tokenizer_file = model_tokenizer(resolve_model_source(args.init)[2])
    eot = eot_id(tokenizer)
    examples = read_examples(args.data)
    if args.val_data:
        train_set, val_set = examples, read_examples(args.val_data)
    else:
        shuffled = examples[:]
        random.Random(args.seed).shuffle(shuffled)
        n_val = max(1, round(len(shuffled) * args.val_fraction)) if args.val_fraction > 0 else 0
        if n_val >= len(shuffled):
            raise UserError(
                f"--data {args.data}: {len(examples)} example(s) leave none to train on after "
                f"--val-fraction {args.val_fraction}; add examples or pass --val-data"
            )
        train_set, val_set = shuffled[n_val:], shuffled[:n_val]
    model = load_model_dir(args.init)
    seq_len = args.seq_len or model.config.max_seq_len
    model.config.check_seq_len(seq_len)
    packed = pack([tokenize(m, tokenizer, eot) for m in train_set], seq_len)
    if len(packed.idx) == 0:
        raise UserError(f"--data {args.data}: no example keeps a reply token within --seq-len {seq_len}")
    config = TrainConfig(
        ds_config=args.ds_config,
        model="(init)",
        out=args.out,
        max_steps=args.max_steps,
        seq_len=seq_len,
        micro_batch_size=args.micro_batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        precision=args.precision,
        seed=args.seed,
        log_interval=args.log_interval,
        resume="none",
    )
    config.check()
    ds, batch, precision, stage = deepspeed_config(config, load_ds_config(args.ds_config), model.config, world)
    plan = Plan(
        config, rank, local_rank, world, None, None, None, model.config, seq_len, ds, batch, precision, stage, None
    )

    out = Path(args.out)
    summary = {
        "init": str(args.init),
        "data": args.data,
        "train_examples": len(train_set),
        "val_examples": len(val_set),
        "packed_rows": len(packed.idx),
        "truncated": packed.truncated,
        "dropped": packed.dropped,
        "seq_len": seq_len,
        "world_size": world,
        "zero_stage": stage,
        "precision": precision,
        "global_batch_rows": batch.global_size,
        "max_steps": args.max_steps,
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(
            f"fine-tuning {model.config.num_parameters():,} parameters from {args.init}: {len(train_set)} examples "
            f"packed into {len(packed.idx)} rows of {seq_len} tokens "
            f"({packed.truncated} cut, {packed.dropped} dropped), "
            f"{world} rank(s), ZeRO-{stage}, {precision}, {args.max_steps} steps",
            flush=True,
        )

    import torch.distributed as dist

    device = init_distributed(plan)
    if rank == 0 and val_set:  # on the GPU, before DeepSpeed takes the model (the other ranks wait in initialize)
        summary["before"] = evaluate_model(model.to(device), tokenizer, eot, val_set, seq_len, args.eval_examples)
        print(
            "before: val loss {val_loss:.4f} | exact match {exact_match:.3f} on {exact_match_examples} prompts".format(
                **summary["before"]
            ),
            flush=True,
        )
    engine = build_engine(plan, device, model.train())
    batches = PackedBatches(packed, batch.micro, args.seed, rank, world)
    log = MetricsLog(out / "metrics.jsonl", rank == 0, getattr(engine, "monitor", None))
    window, window_steps, start, skipped = torch.zeros((), device=device), 0, time.perf_counter(), 0
    for step in range(1, args.max_steps + 1):
        loss, applied = train_step(plan, engine, batches, device)
        if applied:
            window += loss
            window_steps += 1
        else:
            skipped += 1
        if step % args.log_interval == 0 or step == args.max_steps:
            dist.all_reduce(window, op=dist.ReduceOp.SUM)
            elapsed = time.perf_counter() - start
            record = {
                "step": step,
                "lr": engine.get_lr()[0],
                "skipped_steps": skipped,
                "rows_per_second": batch.global_size * window_steps / max(elapsed, 1e-9),
            }
            if window_steps:
                record["loss"] = (window / window_steps / world).item()
            else:  # every step of the window was skipped: no loss to report (not 0.0), as the trainer logs it
                record["skipped"] = True
            log.write(
                record,
                f"step {step:>5}/{args.max_steps} | loss {record.get('loss', math.nan):.4f} | "
                f"lr {engine.get_lr()[0]:.3e}",
            )
            window.zero_()
            window_steps, start = 0, time.perf_counter()
    tag = out / "checkpoints" / "final"
    engine.save_checkpoint(str(tag.parent), tag=tag.name)
    dist.barrier()
    if rank == 0:  # fp32 weights from the ZeRO partitions (any stage), as a model folder
        write_json_atomic(out / CONFIG_FILE, {"model": model.config.to_dict(), "finetune": summary})
        write_json_atomic(
            tag / COMPLETE_MARKER,
            {
                "step": args.max_steps,
                "world_size": world,
                "zero_stage": stage,
                "precision": precision,
                "model": model.config.to_dict(),
            },
        )
        save_model_dir(load_model_dir(tag), out, tokenizer_file, extra={"finetune": summary})
        if val_set:
            summary["after"] = evaluate_model(
                load_model_dir(out, device), tokenizer, eot, val_set, seq_len, args.eval_examples
            )
            print(
                "after: val loss {val_loss:.4f} | exact match {exact_match:.3f} on {exact_match_examples} "
                "prompts".format(**summary["after"]),
                flush=True,
            )
        write_json_atomic(out / SUMMARY_FILE, summary)
        print(f"fine-tuned model: {out} (python -m dsllm generate --checkpoint {out} --prompt ...)", flush=True)
    log.close()
    dist.barrier()
    engine.destroy()
    dist.destroy_process_group()
    return 0


def cli(argv=None) -> int:
    """Under the launcher every rank finds the same bad input: one line from rank 0, exit 2 everywhere."""
    from dsllm.train_config import world_from_env

    try:
        return main(argv)
    except UserError as err:
        if world_from_env()[0] == 0:
            sys.stderr.write(f"error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(cli())
