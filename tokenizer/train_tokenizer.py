#!/usr/bin/env python
"""Train a byte-level BPE tokenizer: --input PATH [PATH ...] --vocab-size N --output DIR."""

import sys

from dsllm.data.train_tokenizer import main
from dsllm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
