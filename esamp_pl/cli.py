"""What every script's ``main`` shares: user errors as one line, Ctrl-C and SIGTERM as a clean stop.

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    @script_main
    def main(cfg): ...

:func:`script_main` runs the task with SIGTERM turned into :class:`~esamp_pl.errors.Interrupted`
(so a killed job stops the way Ctrl-C does: what is done is kept, the summary says interrupted),
prints a user error (:class:`~esamp_pl.errors.UserError` and the checkpoint / model / corpus errors,
which derive from it) as ``error: <message>`` on stderr with exit status 2, and an interruption as one
line with exit status 128 + the signal. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from esamp_pl.errors import Interrupted, UserError

F = TypeVar("F", bound=Callable[..., Any])
USER_ERROR_EXIT = 2


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted("received SIGTERM", signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Interrupted` in the main thread, as Ctrl-C would."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def script_main(task: F) -> F:
    """Wrap a script's task function (see the module docstring)."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_as_interrupt():
                return task(*args, **kwargs)
        except Interrupted as stop:
            print(f"interrupted ({stop.signal_name}){': ' + stop.message if stop.message else ''}", file=sys.stderr)
            sys.exit(stop.exit_code)
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)

    return wrapper  # type: ignore[return-value]
