#!/usr/bin/env python
"""Clean and tokenize a corpus into DIR/{train,val}.{bin,idx}, tokenizer.json and meta.json."""
import sys

from dsllm.errors import run_cli
from dsllm.data.prepare import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
