#!/usr/bin/env python
"""Check a prepared dataset: exit 0 and a summary when sound, exit 2 naming the fault."""

import sys

from dsllm.data.validate import main
from dsllm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
