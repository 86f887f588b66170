#!/usr/bin/env python
"""Train a byte-level BPE tokenizer: --input PATH [PATH ...] --vocab-size N --output DIR."""

import sys

from dsllm.errors import run_cli
from dsllm.tokenizer import train_main

if __name__ == "__main__":
    sys.exit(run_cli(train_main))
