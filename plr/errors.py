"""Errors a user can fix, and how the command line reports them.

The rule:

* A problem in what the user gave -- a config key, a command-line argument,
  a data file, a checkpoint, a run directory -- raises :class:`UserError`
  (a ``ValueError``, so API callers may catch either) or one of the standard
  ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` raised by an
  argument check (``TypeError`` stays an internal error: the config checks
  turn every wrongly typed value into a ``UserError``). The message names the thing (the key, the
  file and line, the argument), the expected and the received value;
  ``hint`` says how to fix it.
* A training run that stops on a non-finite or diverging loss raises
  ``plr.guards.TrainingDiverged`` (a ``RuntimeError``).
* Anything else is an internal error (a bug): the command line shows its
  traceback.

``plr.cli.main`` is the one place that turns these into one line on stderr,
``plr: error: <what> — <how to fix>``, and exit code 2 (``--debug`` shows the
traceback instead).
"""

from __future__ import annotations

from typing import Optional


class UserError(ValueError):
    """A problem with the user's input; ``hint`` says how to fix it."""

    def __init__(self, what: str, hint: Optional[str] = None):
        super().__init__(what if not hint else f"{what} — {hint}")
        self.what = what
        self.hint = hint


# Exceptions the command line reports as user errors (one line, exit code 2).
USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) \
            and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split())
