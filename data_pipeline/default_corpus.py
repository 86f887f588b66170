#!/usr/bin/env python
"""Build (once, cached) the embedded default dataset from the Python standard library's sources."""

import sys

from dsllm.data.default_corpus import main
from dsllm.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
