"""Every failure a user can see is an :class:`RclipError`.

The command line prints ``message`` as one red line and ``hint`` below it, and exits with
``exit_code``: 2 for bad input or usage (the user can fix it), 1 for runtime failures.
"""

from __future__ import annotations


class RclipError(Exception):
    """Base class. ``hint`` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line, always
        return " ".join(str(self.message).split())


class InputError(RclipError):
    """Bad input: a missing or unreadable file, a malformed argument, bad boxes, ..."""

    exit_code = 2


class WeightsError(InputError):
    """A weights file that does not fit the architecture, is unsafe, or is corrupt."""


class ConfigError(InputError):
    """A recipe with unknown keys or wrongly typed values."""


class OfflineError(RclipError):
    """Something had to be downloaded and the network is unreachable."""

    exit_code = 1


class RuntimeFailure(RclipError):
    """A failure that is not the user's input (out of memory, a crashed worker, ...)."""

    exit_code = 1
