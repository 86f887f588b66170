#!/usr/bin/env python
"""DPO of a fine-tuned model on preference pairs:  deepspeed launch/dpo.py --ds_config ds_configs/zero2.json
--init RUN_DIR --data pairs.jsonl --out DIR  (also `dsllm dpo`)."""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("dpo"))
