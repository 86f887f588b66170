"""`python -m dsllm COMMAND …`: one module per command verb."""

import importlib
import sys

from dsllm.errors import USER_ERROR_EXIT, run_cli

COMMANDS = {
    "evaluate": "dsllm.evaluation",
    "generate": "dsllm.generate",
    "export": "dsllm.export",
    "consolidate": "dsllm.consolidate",
    "plan": "dsllm.plan",
    "report": "dsllm.report",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or sys.argv[1] not in COMMANDS:
        known = ", ".join(COMMANDS)
        if len(sys.argv) >= 2 and sys.argv[1] not in ("-h", "--help"):
            sys.stderr.write(f"error: unknown command {sys.argv[1]!r}; use one of: {known}\n")
            return USER_ERROR_EXIT
        print(f"usage: python -m dsllm COMMAND [options]\ncommands: {known}\n'python -m dsllm COMMAND --help' for each")
        return 0
    module = importlib.import_module(COMMANDS[sys.argv[1]])
    return run_cli(module.main, sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
