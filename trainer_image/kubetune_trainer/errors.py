"""The trainer's user-facing error: a problem the job's author fixes (bad model URI, a method this
machine cannot run, target modules that match nothing ...). The entry points print its message as
one line and exit non-zero, without a stack trace; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class JobError(RuntimeError):
    """A problem with the job or the machine, stated in one line that names the spec field."""
