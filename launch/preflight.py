#!/usr/bin/env python
"""Check a multi-host launch before any rank trains: hosts reachable, same code/venv/dataset, free GPU
memory, NCCL variables, batch arithmetic for the whole world size.
    python launch/preflight.py --hostfile hostfile --data data/ --ds_config ds_configs/zero2.json"""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("preflight"))
