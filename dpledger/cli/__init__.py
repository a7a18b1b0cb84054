"""The ``dpledger`` command line (typer), a thin face over library calls.

Every command parses its flags, calls one library function and prints. Errors the
user can fix (bad files, parameters, unknown runs) print one line on stderr and
exit 2 — the library's parameter names shown as this CLI's flags; ``--json`` output
is pure JSON on stdout, with logs and progress on stderr. Commands live by group in
:mod:`.ingest`, :mod:`.accounting`, :mod:`.training` and :mod:`.reading`.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from dpledger.analysis.validate import ParameterError
from dpledger.warehouse.errors import UserError

from . import reading, accounting, training, ingest, watch, export  # noqa: F401,I001 - each registers its commands on app, in this order
from .common import app, err, user_message

__all__ = ["app", "entry", "main"]


class _Stderr(logging.Handler):
    """The library's notices (e.g. waiting for a busy database), one line each on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(record.getMessage().rstrip() + "\n")


def _normalise_param_pairs(argv: list[str]) -> list[str]:
    """``-p name value`` -> ``-p name=value`` (typer options take one value each)."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-p", "--param") and i + 2 < len(argv) and "=" not in argv[i + 1]:
            out += [tok, f"{argv[i + 1]}={argv[i + 2]}"]
            i += 3
            continue
        out.append(tok)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app, turning user errors into one line and exit 2."""
    from typer._click.exceptions import NoArgsIsHelpError  # typer vendors click
    from typer.exceptions import Abort, Exit, TyperException

    log = logging.getLogger("dpledger")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
        log.setLevel(logging.INFO)
    args = _normalise_param_pairs(list(sys.argv[1:] if argv is None else argv))
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="dpledger", standalone_mode=False)
    except (UserError, ParameterError) as exc:
        err(f"error: {user_message(exc)}")
        return 2
    except NoArgsIsHelpError as exc:  # bare `dpledger` or `dpledger ingest`: the help, not an error
        print(exc.ctx.get_help())
        return 0
    except Exit as exc:
        return exc.exit_code
    except Abort:
        err("aborted")
        return 130
    except TyperException as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        err(f"error: {message}{hint}")
        return 2
    except BrokenPipeError:
        return 0
    return rv if isinstance(rv, int) else 0


def entry() -> None:  # pragma: no cover - console script
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `dpledger ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)
