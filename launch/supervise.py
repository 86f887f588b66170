#!/usr/bin/env python
"""Restart a training job after failures, resuming from its last checkpoint:
python launch/supervise.py --max-restarts 3 -- deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json …"""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("supervise"))
