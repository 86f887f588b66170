#!/usr/bin/env python
"""Build (once, cached) the embedded default dataset from the Python standard library's sources
(`dsllm default-corpus`)."""

import sys

from dsllm.cli import run_verb

if __name__ == "__main__":
    sys.exit(run_verb("default-corpus"))
