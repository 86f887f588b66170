#!/usr/bin/env python
"""A reward model trained on preference pairs:  deepspeed launch/reward_model.py --ds_config
ds_configs/zero2.json --init RUN_DIR --data pairs.jsonl --out DIR  (also `dsllm reward-model`)."""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("reward-model"))
