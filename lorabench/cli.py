"""The command line: `lorabench run | plan | report | compare | check | proof | list | merge | history`.

    lorabench --help

Every input is validated before any work starts; a bad one prints one line naming the problem
and the accepted values, exits with code 2, and writes nothing. The flags are in `parser`, the
commands in `commands`.
"""

from __future__ import annotations

import sys
from typing import Sequence

from . import commands
from .parser import EXIT_USAGE, UsageError, build_parser

COMMANDS = {
    "run": commands.cmd_run,
    "report": commands.cmd_report,
    "list": commands.cmd_list,
    "merge": commands.cmd_merge,
    "compare": commands.cmd_compare,
    "check": commands.cmd_check,
    "history": commands.cmd_history,
    "proof": commands.cmd_proof,
    "plan": commands.cmd_plan,
}


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import InputError
    from .forksafe import keep_out
    from .run.worker import quiet_library_warnings

    keep_out()  # the parent of a run never initialises CUDA: bitsandbytes' import would (lorabench/forksafe.py)
    quiet_library_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except (UsageError, InputError) as e:
        print(f"lorabench {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
