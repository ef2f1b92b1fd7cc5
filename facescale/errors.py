"""Errors caused by input (config, data, checkpoints, eval sets...): what is wrong, where, and what to do.

Modules raise `InputError` (or a subclass such as `ConfigError`); the CLI (`report_errors`) turns it into
one line `facescale <command>: error: <where>: <what>; <fix>` and exit code `INPUT_ERROR_EXIT_CODE`, with
no traceback unless `--debug` or FACESCALE_DEBUG=1. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

INPUT_ERROR_EXIT_CODE = 2  # as argparse's usage errors: the input is wrong, a retry or requeue will not help
DEBUG_ENV = "FACESCALE_DEBUG"


class InputError(Exception):
    """Bad input the user can fix: `what` is wrong, `where` (a file, key or shard), `fix` says what to do.

    `InputError("message")` alone is accepted (subclasses' old call sites); `default_fix` then fills the fix.
    Set `every_rank = True` on an error every rank raises alike after the process group started (e.g. from a
    collective check): then only rank 0 prints it.
    """

    every_rank = False

    default_fix = ""

    def __init__(self, what: str, *, where: str | Path = "", fix: str = "") -> None:
        self.what, self.where, self.fix = str(what), str(where), fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = (f"{self.where}: {self.what}" if self.where else self.what).rstrip()  # the fix on its line
        return f"{text}; {self.fix}" if self.fix else text

    def line(self) -> str:
        """The message as one line; ends with what to do (the class's `default_fix` when none was given)."""
        text = str(self)
        if "Original Traceback" in text:  # re-raised by a DataLoader worker: keep the original message
            last = [line for line in text.splitlines() if line.strip()][-1].strip()
            text = re.sub(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: ", "", last)  # drop `module.Class: `
        text = " ".join(text.split())
        if not self.fix and self.default_fix and ";" not in text:
            text = f"{text}; {self.default_fix}"
        return text


# a path the user gave that is missing, unreadable or already taken; the message names the file
PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


# a path on storage that cannot take the write (errno -> what to do); the message names the file
STORAGE_FIXES = {
    errno.EROFS: "write to another folder (or remount that file system read-write)",
    errno.ENOSPC: "free space there or write to another folder",
    errno.EDQUOT: "free space within your quota there or write to another folder",
}


def is_storage_error(exc: BaseException) -> bool:
    """A write that failed on a full, over-quota or read-only file system, naming the path."""
    return isinstance(exc, OSError) and exc.errno in STORAGE_FIXES and bool(exc.filename)


def as_input_error(exc: BaseException) -> InputError:
    """`exc` itself, or an OS error about a path phrased as an `InputError` naming the file."""
    if isinstance(exc, InputError):
        return exc
    fix = STORAGE_FIXES.get(getattr(exc, "errno", None), "check the path and its permissions")
    if getattr(exc, "filename", None) and getattr(exc, "strerror", None):
        return InputError(exc.strerror.lower(), where=exc.filename, fix=fix)
    text = str(exc)
    return InputError(text) if ";" in text else InputError(text, fix=fix)


def debug_enabled(argv: list[str] | None = None) -> bool:
    """Whether tracebacks are wanted: `--debug` on the command line or FACESCALE_DEBUG=1."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in (argv or [])


def _rank() -> int:
    """This process's rank under a launcher (0 when alone): only rank 0 reports start-up input errors."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _group_is_up() -> bool:
    """Whether this process joined a process group: errors after that may be one rank's own (its data)."""
    failure = sys.modules.get("facescale.parallel.failure")
    return bool(failure is not None and failure.joined())


def error_line(command: str, exc: InputError) -> str:
    """`facescale <command>: error: ...`, naming the rank and host when the failure may be one rank's own."""
    several = os.environ.get("WORLD_SIZE", "1") not in ("", "1")
    prefix = f"rank {_rank()} on {socket.gethostname()}: " if several and _group_is_up() else ""
    return f"{command}: error: {prefix}{exc.line()}"


def report_errors(command: str, run: Callable[[], int], debug: bool = False) -> int:
    """Run a command; an `InputError` becomes one line on stderr and a non-zero exit code.

    Before the process group starts every rank meets the same error, so only rank 0 prints it; afterwards
    the rank that raised it prints it (with its rank and host), since it may be the only one that failed,
    unless the error says it is raised by `every_rank`.
    """
    failure = sys.modules.get("facescale.parallel.failure")
    if failure is not None:
        failure.forget()  # a group of an earlier command in this process (tests) is not this one's
    try:
        return run()
    except Exception as exc:
        if isinstance(exc, (InputError, *PATH_ERRORS)) or is_storage_error(exc):
            return _input_failure(command, exc, debug)
        if not _group_is_up():
            _tell_launcher_crash(exc)
            raise
        return _rank_failure(command, exc, debug)


def _tell_launcher(line: str) -> None:
    """Under torchrun (its agent gives each worker a TORCHELASTIC_ERROR_FILE) write this process's one-line
    reason there, in the agent's format: its failure summary's root cause then names the problem instead
    of a link to its documentation. Elsewhere nothing."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        Path(path).write_text(json.dumps(data))
    except OSError:
        pass  # the summary keeps its link; the line is on stderr anyway


def _tell_launcher_crash(exc: BaseException) -> None:
    """A bug: its traceback into torchrun's error file (as torch's own `record` decorator writes it)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)


def _input_failure(command: str, exc: Exception, debug: bool) -> int:
    """One line for input the user can fix (see report_errors), and its exit code."""
    if debug:
        traceback.print_exc()
    if _group_is_up():
        from facescale.parallel.failure import report

        report("input", exc)  # the other ranks then leave the explanation to this line
    line = error_line(command, as_input_error(exc))
    if _rank() == 0 or (_group_is_up() and not getattr(exc, "every_rank", False)):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    _tell_launcher(line)
    return getattr(exc, "exit_code", INPUT_ERROR_EXIT_CODE)  # a class may name its own (never 3: requeue)


def _rank_failure(command: str, exc: Exception, debug: bool) -> int:
    """A failed collective becomes one line naming the rank that died or hung; a bug keeps its traceback."""
    from facescale.parallel import failure

    if not failure.is_collective_failure(exc):
        failure.report("crash", exc)
        _tell_launcher_crash(exc)
        raise exc
    if debug:
        traceback.print_exc()
    line = failure.diagnose(exc)
    if line:
        sys.stderr.write(f"{command}: error: {line}\n")
        sys.stderr.flush()
        _tell_launcher(f"{command}: error: {line}")
    return failure.COLLECTIVE_FAILURE_EXIT_CODE
