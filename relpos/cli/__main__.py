"""``python -m relpos.cli {train,eval,plot} [overrides...]``."""

import importlib
import sys

COMMANDS = ("train", "eval", "plot")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m relpos.cli {{{','.join(COMMANDS)}}} [overrides...]")
    command = sys.argv.pop(1)
    importlib.import_module(f"relpos.cli.{command}").main()
