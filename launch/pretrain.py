#!/usr/bin/env python
"""Pretrain a GPT on DeepSpeed:  deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json [options]
Also runs as a plain `python launch/pretrain.py ...` (one process). `--help` lists the options."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # and DeepSpeed does not print its accelerator guess

from dsllm.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
