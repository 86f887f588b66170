#!/usr/bin/env python
"""Check the shards prepared into DIR (prepare.py --num-shards K --shard-index I) and write DIR/manifest.json,
tokenizer.json and meta.json, making DIR one dataset (`dsllm merge-shards`)."""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("merge-shards"))
