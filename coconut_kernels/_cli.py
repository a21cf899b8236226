"""How the console scripts report a user error: one line ``<prog>: error: <message>`` on stderr and exit
status 2 (argparse's convention), the traceback only with ``--debug``.

A user error is the library's own (`errors.CoconutError`, a `ValueError`) or a file-system error (`OSError`,
reported with the file's name); anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


def run_cli(prog: str, body: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """Call ``body(argv)`` (``--debug`` removed from argv); a user error becomes one line and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return body(argv)
    except (ValueError, OSError) as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, ValueError):
        where = f"{e.filename}: " if e.filename else ""
        text = f"{where}{e.strerror or e}"
    else:
        text = str(e)
    return " ".join(text.split())
