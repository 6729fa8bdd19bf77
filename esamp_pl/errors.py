"""The errors a user can fix, as opposed to bugs: the scripts print these as one message, no traceback.

Every error here says what is wrong (the key and the value) and how to fix it. Anything else that
escapes a script is a bug and keeps its traceback (see :mod:`esamp_pl.cli`).
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A problem the user fixes (bad setting, missing file, no GPU); the message names the fix."""


class ConfigError(UserError, ValueError):
    """A config value (or a file it names) cannot be used; raised before any model is loaded."""


class SetupError(UserError, RuntimeError):
    """The machine cannot run what was asked (no GPU, model too big for the CPU, folder in use)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, as one exception whose message says what was kept and how to resume."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.message = message
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + the signal number."""
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return "SIGTERM" if self.signum == signal.SIGTERM else "Ctrl-C"
