#!/usr/bin/env python
"""Instruction fine-tuning of a pretrained run:  deepspeed launch/finetune.py --ds_config ds_configs/zero2.json
--init RUN_DIR --data sft.jsonl --out DIR  (also a plain `python launch/finetune.py ...`, one process)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from dsllm.finetune import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
