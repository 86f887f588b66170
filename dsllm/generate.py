"""`python -m dsllm generate --checkpoint RUN_DIR [--prompt TEXT ...] [--prompt-file FILE]`: text from a
run's model, printed token by token as it is produced; the tokenizer comes from the run.

Each prompt starts a document (it follows <|endoftext|>, as every document does in training) and is
echoed, then its continuation streams until <|endoftext|> or --max-new-tokens. Several prompts run one
after another, each under a `=== prompt I/N ===` line.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.errors import ArgumentParser, UserError, finite, positive
from dsllm.jsonl import read_jsonl

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_MAX_NEW_TOKENS = 256


class TextStream:
    """Writes a continuation as its tokens arrive. The whole continuation is decoded each time and only the
    new suffix written, so a character whose UTF-8 bytes span several byte-level tokens comes out whole."""

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.text = ""  # written so far

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._write_up_to(self.tokenizer.decode(self.ids).rstrip("\ufffd"))  # a partial character waits

    def finish(self) -> str:
        self._write_up_to(self.tokenizer.decode(self.ids))
        return self.text

    def _write_up_to(self, text: str) -> None:
        if len(text) > len(self.text) and text.startswith(self.text):
            self.write(text[len(self.text) :])
            self.text = text


def read_prompts(texts: list[str], files: list[str]) -> list[str]:
    """--prompt values, then each --prompt-file: one prompt a line; in a .jsonl file one JSON string or
    {"prompt": str} a line (for prompts with line breaks)."""
    prompts = list(texts)
    for file in files:
        path = Path(file)
        if path.name.lower().endswith(".jsonl"):
            for where, record in read_jsonl(path, "--prompt-file"):
                prompt = record.get("prompt") if isinstance(record, dict) else record
                if not isinstance(prompt, str):
                    raise UserError(f'{where}: each line needs a JSON string or {{"prompt": str}}')
                prompts.append(prompt)
            continue
        if not path.is_file():
            raise UserError(f"--prompt-file {path}: no such file")
        try:
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise UserError(f"--prompt-file {path}: not UTF-8; save the file as UTF-8") from None
    return prompts or [""]  # no prompt: an unconditional sample, from <|endoftext|> alone


MAX_TEMPERATURE = 100.0  # far past the point where sampling is uniform; 1e39 overflows float32 logits to nan


def _device(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda or cuda:N (a meta or other device cannot hold the weights)."""
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device to generate on; use auto, cpu, cuda or cuda:N")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="dsllm generate",
        epilog=__doc__.split("\n\n")[1],
        description="Text from a run's model, printed token by token as it is produced.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR",
        help="the model to sample: a run folder (its final weights, else its newest checkpoint), a "
        "checkpoints/stepNNNNNNNN folder (any ZeRO stage), or a model folder",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="text to continue; repeat for several prompts (none: a sample from <|endoftext|> alone)",
    )
    parser.add_argument(
        "--prompt-file",
        action="append",
        default=[],
        metavar="FILE",
        help='prompts from a file, one a line; in a .jsonl file a JSON string or {"prompt": str} a line',
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive,
        metavar="N",
        help=f"most tokens to add to each prompt (default: up to {DEFAULT_MAX_NEW_TOKENS}, as the model's context "
        "allows); it stops earlier at <|endoftext|>",
    )
    parser.add_argument(
        "--temperature",
        type=finite,
        default=0.8,
        metavar="T",
        help=f"randomness of sampling: 0 is greedy (always the most likely token), higher is more random, at most "
        f"{MAX_TEMPERATURE:g}",
    )
    parser.add_argument("--top-k", type=positive, metavar="K", help="sample among the K most likely tokens only")
    parser.add_argument(
        "--top-p",
        type=finite,
        metavar="P",
        help="nucleus sampling: the smallest set of tokens whose probability reaches P (0 < P <= 1)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", help="the same seed gives the same text (default: random, printed on stderr)"
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt in the chat template of launch/finetune.py (for fine-tuned models)",
    )
    parser.add_argument(
        "--device",
        type=_device,
        default="auto",
        help="where to run: auto (cuda when available, else cpu), cpu, cuda or cuda:N",
    )
    return parser


def main(argv=None) -> int:
    """`python -m dsllm generate --checkpoint RUN_DIR [--prompt TEXT ...] [sampling options]`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.temperature <= MAX_TEMPERATURE:
        parser.error(
            f"argument --temperature: {args.temperature:g} must be 0 (greedy) or more, at most {MAX_TEMPERATURE:g}"
        )
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"argument --top-p: {args.top_p} must be above 0 and at most 1")
    # the heavy imports (torch) come after parsing, so --help and a bad option answer at once
    from dsllm.model_dir import load_model_dir, model_tokenizer, pick_device, resolve_model_source
    from dsllm.tokenizer import eot_id

    tokenizer = model_tokenizer(resolve_model_source(args.checkpoint)[2])[0]
    eos = eot_id(tokenizer)
    prompts = read_prompts(args.prompt, args.prompt_file)
    device = pick_device(args.device)
    model = load_model_dir(args.checkpoint, device)
    context_len = model.config.max_seq_len
    if args.chat:  # the fine-tuning template, tokenized piece by piece as in training
        from dsllm.sft_data import context_ids

        contexts = [context_ids([{"role": "user", "content": prompt}], tokenizer, eos) for prompt in prompts]
    else:
        contexts = [[eos] + tokenizer.encode(prompt, add_special_tokens=False).ids for prompt in prompts]
    budgets = []
    for i, context in enumerate(contexts, 1):
        room = context_len - len(context)
        which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if room < 1:
            raise UserError(
                f"{which} is {len(context) - 1} tokens, which leaves no room in the model's context "
                f"(model.max_seq_len = {context_len}, one token goes to <|endoftext|>); shorten it"
            )
        if args.max_new_tokens is not None and args.max_new_tokens > room:
            raise UserError(
                f"--max-new-tokens {args.max_new_tokens}: {which} ({len(context) - 1} tokens) leaves room "
                f"for {room} in the model's context (model.max_seq_len = {context_len}); pass at most {room}"
            )
        budgets.append(args.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, room))
    seed = args.seed
    if seed is None:
        seed = secrets.randbelow(2**31)
        print(f"seed {seed} (pass --seed {seed} for the same text again)", file=sys.stderr, flush=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    for i, (prompt, context, budget) in enumerate(zip(prompts, contexts, budgets), 1):
        if len(prompts) > 1:
            write(("\n" if i > 1 else "") + f"=== prompt {i}/{len(prompts)} ===\n")
        write(f"user: {prompt}\nassistant: " if args.chat else prompt)
        stream = TextStream(tokenizer, write)
        model.generate(
            [context],
            budget,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_id=eos,
            seed=seed,
            vocab_size=vocab_size,
            on_token=lambda _, token, stream=stream: stream.add(token),
        )
        stream.finish()
        write("\n")
    return 0
