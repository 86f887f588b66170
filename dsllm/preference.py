"""Preference alignment on the same engine, loop and launcher: DPO (`dsllm dpo`) and a reward model (`dsllm
reward-model`), both trained on pairs, as the seeds' RLHF route describes.

    deepspeed launch/dpo.py --ds_config ds_configs/zero2.json --init runs/sft --data pairs.jsonl --out runs/dpo
    deepspeed launch/reward_model.py --ds_config ds_configs/zero2.json --init runs/sft --data pairs.jsonl \\
        --out runs/reward

--data is JSONL, a line per pair: {"prompt": str, "chosen": str, "rejected": str}. The prompt is rendered as a user
turn of the fine-tuning chat template (`dsllm.sft_data`) and each response follows it as the assistant's reply,
closed by the document token: what `dsllm finetune` trains and `dsllm generate --chat` asks. Rows longer than
--seq-len (default: the model's context) are cut at the end.

DPO (Rafailov et al. 2023): the loss is -log sigmoid(beta x ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) -
log ref(rejected)))), each log-probability summed over the response's tokens. The reference is the --init model,
frozen: its log-probabilities of every pair are computed once, before training, on the device and shared out over the
ranks (the precomputed form; no second model in memory), and kept in the run folder for a resumed run. The implicit
reward of a response is beta x (log pi - log ref); preference accuracy is the share of held-out pairs whose chosen
response gets the higher one (a tie counts a half: 0.5 before training), the margin its mean difference. The result
is the policy, a model folder.

The reward model puts a scalar head (zero at the start: every reward 0, accuracy 0.5) on the last token of prompt +
response and trains it and the model on -log sigmoid(r(chosen) - r(rejected)) (Ouyang et al. 2022); accuracy is the
share of held-out pairs it ranks right. The result is the model folder with the head in reward_head.safetensors.

PPO, the last step of that route, is not here: it needs generation inside the training loop (rollouts from the
policy, scored by the reward model, a value head, a KL penalty against the reference), a second engine, and far more
compute per step than this toolkit's CPU tests can exercise; DPO optimises the same objective from the pairs directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.cli_args import add_config_arguments, add_launcher_argument, add_recipe_argument, parse_config
from dsllm.errors import ArgumentParser, UserError
from dsllm.jsonl import read_jsonl
from dsllm.run_spec import World
from dsllm.train_config import DPOConfig, RewardConfig

REWARD_HEAD_FILE = "reward_head.safetensors"
REFERENCE_FILE = "reference_log_probs.safetensors"  # DPO's, in the run folder: a resumed run reads them back

if TYPE_CHECKING:
    import torch


def read_pairs(path: str, option: str) -> list[tuple[str, str, str, str]]:
    """(prompt, chosen, rejected, FILE:LINE) of each line; a missing or empty field is a UserError at its line."""
    shape = 'each line needs {"prompt": str, "chosen": str, "rejected": str}'
    pairs = []
    for where, record in read_jsonl(path, option):
        if not isinstance(record, dict):
            raise UserError(f"{where}: a JSON {type(record).__name__}, not an object; {shape}")
        for name in ("prompt", "chosen", "rejected"):
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                what = "missing" if value is None else "empty" if isinstance(value, str) else type(value).__name__
                raise UserError(f"{where}: {name!r} is {what}; {shape}, each non-empty")
        if record["chosen"] == record["rejected"]:
            raise UserError(f"{where}: 'chosen' and 'rejected' are the same text; a pair needs two different responses")
        pairs.append((record["prompt"], record["chosen"], record["rejected"], where))
    if not pairs:
        raise UserError(f"{option} {path}: no pairs in the file; {shape}")
    return pairs


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Pairs as token rows: `rows[2i]` prompt + chosen, `rows[2i + 1]` prompt + rejected, `starts[j]` where row j's
    response begins; `ref[j]` the reference's log-probability of its response (DPO). `idx` counts the pairs, what
    `sft_data.PackedBatches` shuffles; `batch(pairs)` pads their rows to `length`."""

    rows: list[list[int]]
    starts: list[int]
    length: int
    pad: int
    ref: list[float] | None = None

    @property
    def idx(self) -> range:
        return range(len(self.rows) // 2)

    def batch(self, pairs: list[int]) -> dict:
        import torch

        order = [row for pair in pairs for row in (2 * pair, 2 * pair + 1)]
        idx = torch.full((len(order), self.length), self.pad, dtype=torch.long)
        response = torch.zeros(len(order), self.length, dtype=torch.bool)
        for r, row in enumerate(order):
            idx[r, : len(self.rows[row])] = torch.tensor(self.rows[row])
            response[r, self.starts[row] : len(self.rows[row])] = True
        batch = {"idx": idx, "response": response, "last": torch.tensor([len(self.rows[row]) - 1 for row in order])}
        if self.ref:  # (DPO: empty until `reference_log_probs` fills it)
            batch["ref"] = torch.tensor([self.ref[row] for row in order])
        return batch

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.rows, self.starts, self.length]).encode()).hexdigest()[:16]


def encode_pairs(pairs, tokenizer, eot: int, max_len: int) -> Pairs:
    """Each pair's two rows: the chat template's user turn, then the response and the document token, cut to
    `max_len`; a prompt that leaves no response token is a UserError at its line."""
    from dsllm.sft_data import context_ids
    from dsllm.tokenizer import encode_as_text

    rows, starts = [], []
    responses = encode_as_text(tokenizer, [r for _, chosen, rejected, _ in pairs for r in (chosen, rejected)])
    for i, (prompt, _, _, where) in enumerate(pairs):
        context = context_ids([{"role": "user", "content": prompt}], tokenizer, eot)
        if len(context) >= max_len:
            raise UserError(
                f"{where}: the prompt takes {len(context)} tokens of the {max_len} a row holds, leaving none for the "
                "response; shorten it or raise --seq-len"
            )
        for response in responses[2 * i : 2 * i + 2]:
            rows.append((context + response + [eot])[:max_len])
            starts.append(len(context))
    return Pairs(rows, starts, max(map(len, rows)), eot)


def response_log_probs(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """log p(response | prompt) of each row: its response tokens' log-probabilities summed (`logits` of the rows
    without their last token)."""
    targets = batch["idx"][:, 1:]
    scored = batch["response"][:, 1:]
    token = logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token * scored).sum(-1)


def dpo_terms(logits, batch: dict, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(DPO loss, each pair's implicit reward margin beta((pi_c - ref_c) - (pi_r - ref_r)))."""
    import torch.nn.functional as F

    gain = response_log_probs(logits, batch) - batch["ref"]
    margin = beta * (gain[0::2] - gain[1::2])
    return -F.logsigmoid(margin).mean(), margin


def reward_terms(rewards, _batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reward model's loss, each pair's reward margin r(chosen) - r(rejected))."""
    import torch.nn.functional as F

    margin = rewards[0::2] - rewards[1::2]
    return -F.logsigmoid(margin).mean(), margin


def pair_scores(margins: list[float], loss: float) -> dict:
    """Preference accuracy (a tie counts a half), the mean margin, and the loss."""
    accuracy = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    return {"val_loss": loss, "accuracy": accuracy, "margin": sum(margins) / len(margins)}


def score_pairs(terms, forward, pairs: Pairs, device, per_forward: int) -> dict:
    """`pair_scores` of every pair, through `forward` (the module, or the engine on every rank); `terms(output,
    batch)` is `dpo_terms` or `reward_terms` with the output of `forward(batch)`."""
    import torch

    margins, loss = [], 0.0
    with torch.no_grad():
        for start in range(0, len(pairs.idx), per_forward):
            chunk = list(range(start, min(start + per_forward, len(pairs.idx))))
            batch = {k: v.to(device) for k, v in pairs.batch(chunk).items()}
            batch_loss, margin = terms(forward(batch), batch)
            margins += margin.tolist()
            loss += float(batch_loss) * len(chunk)
    return pair_scores(margins, loss / len(pairs.idx))


def reference_log_probs(model, pairs: Pairs, per_forward: int, device, world: World) -> list[float]:
    """The frozen reference's log p(response | prompt) of every row, on the device: the chunks of `per_forward`
    pairs shared out over the ranks (chunk k on rank k mod the world size), then gathered. A chunk is what scoring
    forwards at once, so before training the policy's log-probabilities equal these to the bit (margin 0)."""
    import torch
    import torch.distributed as dist

    model.to(device).eval()
    starts = range(0, len(pairs.idx), per_forward)
    mine: dict[int, list[float]] = {}
    with torch.no_grad():
        for k, start in enumerate(starts):
            if k % world.size == world.rank:
                batch = pairs.batch(list(range(start, min(start + per_forward, len(pairs.idx)))))
                batch = {name: value.to(device) for name, value in batch.items()}
                mine[start] = response_log_probs(model(batch["idx"][:, :-1])[0], batch).tolist()
    parts = [mine]
    if world.size > 1:
        parts = [None] * world.size
        dist.all_gather_object(parts, mine)
    merged = {start: values for part in parts for start, values in part.items()}
    return [value for start in starts for value in merged[start]]


def stored_reference(path: Path, stamp: dict) -> dict | None:
    """The reference log-probabilities `path` holds ({"train": [...], "val": [...]}), if they are of the rows
    `stamp` fingerprints; None otherwise (computed again)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if json.loads(f.metadata().get("rows", "null")) != stamp:
                return None
            return {name: f.get_tensor(name).tolist() for name in ("train", "val")}
    except (OSError, SafetensorError, KeyError, ValueError, AttributeError):
        return None


def preflight(config, world: World | None, kind: str):
    """A checked DPO (`kind` "dpo") or reward-model ("reward") run, as a `dsllm.tuning.Tuning`: the pairs read and
    tokenized, the reference's log-probabilities computed (DPO), the spec resolved, the resume point chosen."""
    from dsllm.classify import classifier, save_with_head
    from dsllm.model import GPT
    from dsllm.model_dir import load_model_dir, save_model_dir
    from dsllm.tokenizer import eot_id
    from dsllm.tuning import Tuning, check_inputs, epoch_plan, split_held_out

    world = world or World.from_env()
    tokenizer, tokenizer_file = check_inputs(config)
    train, val = split_held_out(config, read_pairs, "pair")
    model = load_model_dir(config.init)
    eot, max_len = eot_id(tokenizer), min(config.seq_len or model.config.max_seq_len, model.config.max_seq_len)
    train_pairs, val_pairs = (encode_pairs(p, tokenizer, eot, max_len) for p in (train, val))
    length = max(train_pairs.length, val_pairs.length)
    config, spec, steps_per_epoch = epoch_plan(config, model.config, world, len(train_pairs.idx), length)
    micro = spec.batch.micro
    train_pairs, val_pairs = (dataclasses.replace(p, length=length) for p in (train_pairs, val_pairs))
    prepare = None
    if kind == "dpo":  # the reference: the --init model's log-probabilities, filled in before it trains
        train_pairs, val_pairs = (dataclasses.replace(p, ref=[]) for p in (train_pairs, val_pairs))
        module = model

        def prepare(device, resuming: bool) -> None:
            """On every rank, once the process group is up: read back on a resume, else computed and stored."""
            import torch
            from safetensors.torch import save_file

            path = Path(config.out) / REFERENCE_FILE
            stamp = {"train": train_pairs.fingerprint(), "val": val_pairs.fingerprint()}
            stored = stored_reference(path, stamp) if resuming else None
            if world.size > 1:  # every rank reads them back, or every rank computes its share
                import torch.distributed as dist

                every = torch.tensor([float(stored is not None)], device=device)
                dist.all_reduce(every, op=dist.ReduceOp.MIN)
                stored = stored if every.item() == 1.0 else None
            for name, pairs in (("train", train_pairs), ("val", val_pairs)):
                pairs.ref[:] = stored[name] if stored else reference_log_probs(model, pairs, micro, device, world)
            if world.is_main and not stored:
                values = {"train": torch.tensor(train_pairs.ref, dtype=torch.float64),
                          "val": torch.tensor(val_pairs.ref, dtype=torch.float64)}  # fmt: skip
                save_file(values, str(path.with_suffix(".tmp")), metadata={"rows": json.dumps(stamp)})
                path.with_suffix(".tmp").replace(path)
            if world.is_main:
                how = "read back from" if stored else f"computed on {world.size} rank(s) into"
                print(f"reference: log-probabilities of {len(train_pairs.rows) + len(val_pairs.rows)} responses "
                      f"{how} {path}", flush=True)  # fmt: skip

        def forward_of(forward):
            return lambda batch: forward(batch["idx"][:, :-1])[0]

        def terms(output, batch):
            return dpo_terms(output, batch, config.beta)

    else:
        module = classifier(model, 1)

        def forward_of(forward):
            return lambda batch: forward(batch["idx"], batch["last"])[0][:, 0]

        terms = reward_terms

    def loss(module_, batch: dict, device):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return terms(forward_of(module_)(batch), batch)[0]

    def score(forward, device) -> dict:
        return score_pairs(terms, forward_of(forward), val_pairs, device, micro)

    from dsllm.checkpoint.checkpointer import Checkpointer

    checkpointer = Checkpointer.for_run(config, spec, train_pairs.fingerprint(), kind=kind)
    record = {"beta": config.beta} if kind == "dpo" else {"head": REWARD_HEAD_FILE}

    def save(weights: dict, out: Path) -> None:
        if kind == "dpo":
            policy = GPT(spec.model)
            policy.load_state_dict(weights)
            save_model_dir(policy, out, tokenizer_file, extra={kind: record})
            print(f"policy: {out} (dsllm generate --checkpoint {out} --chat --prompt ...)", flush=True)
            return
        save_with_head(weights, spec.model, out, tokenizer_file, {kind: record}, REWARD_HEAD_FILE)
        print(f"reward model: {out} ({REWARD_HEAD_FILE})", flush=True)

    what = f"DPO (beta {config.beta})" if kind == "dpo" else "reward-model training"
    header = (
        f"{what} of {spec.model.num_parameters():,} parameters from {config.init}: {len(train_pairs.idx)} pairs "
        f"({len(val_pairs.idx)} held out), {steps_per_epoch} steps an epoch, {config.max_steps} steps, "
        f"{spec.world.size} rank(s), ZeRO-{spec.zero_stage}, {spec.precision}"
    )
    summary = {
        "init": str(config.init),
        "data": config.data,
        "train_pairs": len(train_pairs.idx),
        "val_pairs": len(val_pairs.idx),
        "steps_per_epoch": steps_per_epoch,
        "max_steps": config.max_steps,
    }
    tuning = Tuning(kind, config, spec, checkpointer, module, loss, train_pairs, score, record, save, summary,
                    tokenizer_file, header, steps_per_epoch, prepare)  # fmt: skip
    return tuning


def build_parser(kind: str = "dpo") -> ArgumentParser:
    prog, config_class = ("dsllm dpo", DPOConfig) if kind == "dpo" else ("dsllm reward-model", RewardConfig)
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    add_recipe_argument(parser)
    add_config_arguments(parser, config_class)
    add_launcher_argument(parser)
    return parser


def main_of(kind: str):
    def main(argv: list[str] | None = None) -> int:
        from dsllm.run_control import run_training
        from dsllm.tuning import run_tuning

        world = World.from_env()
        config_class = DPOConfig if kind == "dpo" else RewardConfig
        return run_training(
            lambda: preflight(parse_config(config_class, build_parser(kind), argv), world, kind), run_tuning, world
        )

    return main


main = main_of("dpo")
