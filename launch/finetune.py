#!/usr/bin/env python
"""Instruction fine-tuning of a pretrained run:  deepspeed launch/finetune.py --ds_config ds_configs/zero2.json
--init RUN_DIR --data sft.jsonl --out DIR  (also a plain `python launch/finetune.py ...`, or `dsllm finetune`)."""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("finetune"))
