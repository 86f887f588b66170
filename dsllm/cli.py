"""`dsllm VERB [options]`: every command of the toolkit behind one console script (also `python -m dsllm`).

Each verb is a module with `build_parser()` and `main(argv)`, imported only when its verb runs, so
`dsllm --help` and each verb's `--help` stay fast. The scripts under launch/, data_pipeline/ and
tokenizer/ are thin shims over the same verbs: users and launchers run them by path
(`deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json` works as before).
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module, what it does); in the order of a run's life
VERBS = {
    "prepare": ("dsllm.data.prepare", "clean and tokenize a corpus into train/val token files"),
    "merge-shards": ("dsllm.data.shards", "check a sharded dataset's shards and write its manifest"),
    "train-tokenizer": ("dsllm.data.train_tokenizer", "train a byte-level BPE tokenizer on a corpus"),
    "validate": ("dsllm.data.validate", "check a prepared dataset end to end"),
    "default-corpus": ("dsllm.data.default_corpus", "build the embedded default dataset (Python's own sources)"),
    "plan": ("dsllm.plan", "memory and speed of a model on given GPUs, before you rent them"),
    "preflight": ("dsllm.preflight", "check a multi-host launch: hosts, code, data, batch arithmetic"),
    "pretrain": ("dsllm.pretrain", "pretrain a GPT (under `deepspeed` for several ranks)"),
    "finetune": ("dsllm.finetune", "supervised fine-tuning of a pretrained model on JSONL conversations"),
    "finetune-classify": ("dsllm.classify", "a classification head on a pretrained model, trained on labelled texts"),
    "dpo": ("dsllm.preference", "direct preference optimisation on {prompt, chosen, rejected} pairs"),
    "reward-model": ("dsllm.reward_model", "a scalar reward head trained on {prompt, chosen, rejected} pairs"),
    "supervise": ("dsllm.supervise", "rerun a training command after failures, resuming each time"),
    "evaluate": ("dsllm.evaluation", "validation loss, perplexity, bits/byte and multiple-choice accuracy"),
    "generate": ("dsllm.generate", "sample text from a model"),
    "import": ("dsllm.hf_import", "a Hugging Face checkpoint (GPT-2, Llama, Mistral, Qwen) as a model folder"),
    "consolidate": ("dsllm.consolidate", "turn a training checkpoint into a model folder"),
    "export": ("dsllm.export", "export a model to a Hugging Face transformers folder"),
    "report": ("dsllm.report", "plots and a summary of a run"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {verb:<{width}}  {what}" for verb, (_, what) in VERBS.items()]
    return (
        "usage: dsllm VERB [options]\n\nPretrain, fine-tune, evaluate and export GPT models on DeepSpeed.\n\n"
        "verbs:\n" + "\n".join(lines) + "\n\n'dsllm VERB --help' lists each verb's options."
    )


def run_verb(verb: str, argv: list[str] | None = None) -> int:
    """Run one verb's `main` with dsllm's error handling (what the shims under launch/ etc. call)."""
    import os

    from dsllm.errors import run_cli

    if verb == "prepare":  # before numpy loads: OpenBLAS threads only compete with the tokenizer workers (~10%)
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")
    module = importlib.import_module(VERBS[verb][0])
    return run_cli(module.main, sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    from dsllm.errors import USER_ERROR_EXIT

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in VERBS:
        import difflib

        close = difflib.get_close_matches(argv[0], VERBS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        sys.stderr.write(f"error: unknown verb {argv[0]!r}{hint}; use one of: {', '.join(VERBS)} (see dsllm --help)\n")
        return USER_ERROR_EXIT
    return run_verb(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
