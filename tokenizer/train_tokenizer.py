#!/usr/bin/env python
"""Train a byte-level BPE tokenizer: --input PATH [PATH ...] --vocab-size N --output DIR (`dsllm train-tokenizer`)."""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("train-tokenizer"))
