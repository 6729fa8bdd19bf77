"""Shared helpers of the evaluation tests."""

from esamp_pl.evaluation.execution import SandboxError, check_sandbox


def usable_sandbox() -> str:
    """``bwrap`` where bubblewrap can build its sandbox here, else ``process`` (the weaker mode grades the same),
    so grading tests run on a machine without bubblewrap too; the sandbox's own promises are tested in
    test_execution.py, which skips its bwrap cases there."""
    try:
        check_sandbox("bwrap")
    except SandboxError:
        return "process"
    return "bwrap"
