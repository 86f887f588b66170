#!/usr/bin/env python
"""Check a prepared dataset: exit 0 and a summary when sound, exit 2 naming the fault (`dsllm validate`)."""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("validate"))
