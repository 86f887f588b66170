"""`python -m dsllm VERB [options]`: the same as the `dsllm` console script (dsllm.cli)."""

import sys

from dsllm.cli import main

if __name__ == "__main__":
    sys.exit(main())
