#!/usr/bin/env python
"""Classification fine-tuning of a pretrained or imported model:  deepspeed launch/finetune_classify.py --ds_config
ds_configs/zero2.json --init RUN_DIR --data labelled.csv --out DIR  (also `dsllm finetune-classify`)."""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("finetune-classify"))
