#!/usr/bin/env python
"""Pretrain a GPT on DeepSpeed:  deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json [options]
Also a plain `python launch/pretrain.py ...` (one process), or `dsllm pretrain ...`. `--help` lists the options."""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("pretrain"))
