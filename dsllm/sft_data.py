"""Fine-tuning data: JSONL conversations rendered with the chat template, tokenized with the loss on the
assistant's tokens only, and packed into rows of seq_len tokens with a block-diagonal causal mask
(`dsllm.finetune` trains on them; `dsllm generate --chat` renders prompts the same way).

    <|user|>
    {content}
    <|assistant|>
    {content}<|endoftext|>
"""

from __future__ import annotations

import dataclasses
import random

import torch

from dsllm.data.documents import segment_mask
from dsllm.errors import UserError
from dsllm.jsonl import read_jsonl
from dsllm.tokenizer import encode_as_text

ROLES = ("system", "user", "assistant")


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

    def fingerprint(self) -> str:
        """sha256 of the rows (inputs, targets, positions, segments): which data a checkpoint was trained on."""
        import hashlib

        digest = hashlib.sha256()
        for tensor in (self.idx, self.targets, self.positions, self.segments):
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    def batch(self, rows: list[int]) -> dict:
        return {
            "idx": self.idx[rows],
            "targets": self.targets[rows],
            "positions": self.positions[rows],
            "mask": segment_mask(self.segments[rows]),
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
    """Micro batches of rows for one rank: a seeded shuffle per epoch, the same global order on any world size.
    Resumable: `state_dict()` after a step restarts at the next row (`consumed_samples` counts global rows)."""

    def __init__(self, packed: Packed, micro: int, seed: int, rank: int, world: int):
        self.packed, self.micro, self.seed, self.rank, self.world = packed, micro, seed, rank, world
        self.epoch, self.order, self.cursor = 0, [], 0
        self.consumed_samples = 0

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
        self.consumed_samples += need
        return self.packed.batch(rows)

    def state_dict(self) -> dict:
        return {
            "fingerprint": self.packed.fingerprint(),
            "epoch": self.epoch,
            "order": self.order[self.cursor :],
            "consumed_samples": self.consumed_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.packed.fingerprint():
            raise UserError(
                "the checkpoint was trained on other fine-tuning rows (another --data, --val-data, --val-fraction, "
                "--seq-len or --seed); resume with the same options, or start a new run with another --out"
            )
        self.epoch, self.order, self.cursor = state["epoch"], list(state["order"]), 0
        self.consumed_samples = state["consumed_samples"]


@torch.no_grad()
def reply_loss(forward, packed: Packed, device, rows_per_forward: int = 8) -> float:
    """Mean cross-entropy over the reply tokens of packed rows; `forward` is the model or DeepSpeed's engine
    (under ZeRO-3 every rank must call it the same number of times: every rank scores every row)."""
    total, count = 0.0, 0
    for start in range(0, len(packed.idx), rows_per_forward):
        rows = list(range(start, min(start + rows_per_forward, len(packed.idx))))
        batch = {k: v.to(device) for k, v in packed.batch(rows).items()}
        logits, _ = forward(batch["idx"], positions=batch["positions"], mask=batch["mask"])
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-100, reduction="sum"
        )
        total, count = total + loss.item(), count + int((batch["targets"] != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def evaluate_model(model, tokenizer, eot: int, val: list[list[dict]], seq_len: int, examples: int) -> dict:
    """Validation loss on reply tokens (packed as in training) and greedy exact match on the first `examples`
    single-turn examples, with a progress bar (one model, one process)."""
    from tqdm import tqdm

    model.eval()
    device = model.lm_head.weight.device
    val_loss = reply_loss(model, pack([tokenize(m, tokenizer, eot) for m in val], seq_len), device)
    singles = [m for m in val if len(m) == 2 and m[0]["role"] == "user" and m[1]["role"] == "assistant"][:examples]
    right = 0
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    for messages in tqdm(singles, desc="exact match", unit="prompt", disable=None, leave=False):
        context = context_ids(messages[:1], tokenizer, eot)
        room = model.config.max_seq_len - len(context)
        budget = min(room, len(encode_as_text(tokenizer, [messages[1]["content"]])[0]) + 8)
        if budget < 1:
            continue
        new = model.generate([context], budget, temperature=0.0, eos_id=eot, vocab_size=vocab)[0]
        answer = tokenizer.decode([t for t in new if t != eot])
        right += answer.strip() == messages[1]["content"].strip()
    return {"val_loss": val_loss, "exact_match": right / max(len(singles), 1), "exact_match_examples": len(singles)}
