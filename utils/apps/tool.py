"""What every command-line tool shares: main(argv) -> exit status, a failure the user can cause
printed as one `error: ...` line (never a traceback), and the one-line tail `run_tool(main)`.
Light: no torch import, so the data tools stay quick to start."""
from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn

# Bad values and missing or unwritable paths (ModelNotFound, DataError and FileExistsError are
# OSErrors; TokenizerError, ImageError and PromptTooLong are ValueErrors).
USER_ERRORS = (ValueError, OSError)

# Library errors speak of arguments; on the command line they name the flag instead.
FLAG_NAMES = {"pass overwrite=True": "pass --overwrite"}


def as_flags(message: str) -> str:
    for api, flag in FLAG_NAMES.items():
        message = message.replace(api, flag)
    return message


def reports_errors(*errors: type) -> Callable:
    """Decorate a tool's main(argv) -> status: USER_ERRORS and `errors` (e.g. CheckpointError)
    print as one `error: ...` line on stderr and give status 1."""
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except (*USER_ERRORS, *errors) as e:
                print(f"error: {as_flags(str(e))}", file=sys.stderr)
                return 1
        return run
    return wrap


def run_tool(main: Callable[[], int]) -> NoReturn:
    """The last line of every tool: exit with main()'s status. Under torchrun every rank leaves
    together (models.tp.exit_process); torch is imported only where it already is."""
    status = main()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from models.tp import exit_process
        exit_process(status)
    sys.exit(status)
